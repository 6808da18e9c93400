"""`illava-tune submit | jobs | status | cancel | resume | pareto | best | export | db`: thin over `jobs`
(the service's commands are in `illava_tune.service`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from db import Database


def _database(args, *, create: bool = False) -> Database:
    """The database, with its schema checked (a clear "run `illava-tune db upgrade`" otherwise).
    With `create`, a database that was never migrated is set up on the spot: a first `submit`
    on the default SQLite file needs no set-up; one at an older revision is never migrated
    behind the user's back."""
    database = Database(getattr(args, "database", None))
    if create and database.current_revision() is None:
        database.upgrade()
    database.check_schema()
    return database


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_front(rows: list[dict[str, Any]]) -> str:
    """The published schedules as a table, under the lines saying what they were tuned on and in
    and what the memory column is. `speedup` is over the unmerged model, median (min-max) of the
    paired rounds; `~#N` marks a schedule whose speedup range overlaps #N's: the measurement cannot
    tell the two apart on speed."""
    from illava import Schedule  # here: `illava-tune db ...` never imports torch

    header = (f"{'id':>5}  {'latency ms':>10}  {'speedup':>16}  {'memory MiB':>10}  {'accuracy':>8}  {'retention':>9}  "
              f"{'fidelity':>8}  schedule")  # fmt: skip
    tuned = sorted({(row["hardware"], row["dtype"], row["attention"]) for row in rows})
    lines = [f"tuned on {key} (dtype {dtype}, attention {attention})" for key, dtype, attention in tuned]
    sources = sorted({row.get("memory_source") for row in rows if row.get("memory_source")})
    lines += [f"memory: {source}" for source in sources]
    lines += [header, "-" * len(header)]
    for row in rows:
        what = Schedule.from_dict(row["schedule"]).describe() + (
            "" if row.get("status", "candidate") == "candidate" else f" [{row['status']}]"
        )
        near = "".join(f" ~#{other['id']}" for other in rows if _indistinct(row, other))
        lines.append(
            f"{row['id']:>5}  {_ms(row['latency_ms']):>10}  {_speedup(row):>16}  {_ms(row['memory_mib']):>10}  "
            f"{_pct(row['accuracy']):>8}  {_pct(row['retention']):>9}  {_pct(row['fidelity']):>8}  {what}{near}"
        )
    return "\n".join(lines)


def _speedup(row: dict[str, Any]) -> str:
    if row.get("speedup") is None:
        return "-"
    if row.get("speedup_low") is None:
        return f"{row['speedup']:.2f}x"
    return f"{row['speedup']:.2f}x ({row['speedup_low']:.2f}-{row['speedup_high']:.2f})"


def _indistinct(row: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether `row` and `other` (two schedules of one front) differ on speed by less than their
    measured spread (their speedup ranges overlap): nothing measured says which is faster."""
    if other is row or None in (row.get("speedup_low"), other.get("speedup_low")):
        return False
    return row["speedup_low"] <= other["speedup_high"] and other["speedup_low"] <= row["speedup_high"]


def workload_for(backbone: str, workload: str | dict | None = None, *, dataset: str | None = None,
                 limit: int | None = None):  # fmt: skip
    """The workload a job or profile runs: the named preset, file or (from the API) spec dict, else
    the backbone's default, with `dataset` and `limit` applied."""
    import dataclasses

    from profiler import Workload, resolve_workload
    from profiler.datasets import BUILTIN_DATASETS
    from profiler.workload import default_workload

    if isinstance(workload, dict):
        resolved = Workload.from_dict(workload)
    else:
        resolved = resolve_workload(workload or default_workload(backbone))
    if dataset:
        dataset = dataset if dataset in BUILTIN_DATASETS else str(Path(dataset).resolve())
        resolved = dataclasses.replace(resolved, dataset=dataset)
    if limit is not None:
        resolved = dataclasses.replace(resolved, samples=limit)
    return resolved


def submit_job(database: Database, *, backbone: str = "demo", workload: str | dict | None = None,
               dataset: str | None = None, limit: int | None = None, trials: int = 12, workers: int = 1,
               reduction: str = "0.5:0.95", encoder_share: str = "0:0.8", methods: str = "illava",
               min_retention: float | None = None,
               max_memory_mib: float | None = None, max_latency_ms: float | None = None, sampler: str = "tpe",
               seed: int = 0, dtype: str = "float32", attn: str = "sdpa", objective: str = "speedup") -> str:  # fmt: skip
    """`illava-tune submit`'s arguments (and the API's submit body) to a queued job; every error is
    a `jobs.InvalidInput` naming the argument."""
    import jobs
    from jobs import about_field
    from optimizer import Constraints, SearchSpace, parse_range

    # Each range is checked on its own first, so an error names the argument it is about.
    with about_field("reduction"):
        reduction_range = parse_range(reduction)
        SearchSpace(reduction=reduction_range)
    with about_field("encoder_share"):
        share_range = parse_range(encoder_share)
        SearchSpace(encoder_share=share_range)
    with about_field("methods"):
        chosen = tuple(name.strip() for name in str(methods).split(",") if name.strip())
        SearchSpace(methods=chosen)
    with about_field("search_space"):
        space = SearchSpace(reduction=reduction_range, encoder_share=share_range, methods=chosen)
    with about_field("constraints"):
        constraints = Constraints(min_retention=min_retention, max_memory_mib=max_memory_mib,
                                  max_latency_ms=max_latency_ms)  # fmt: skip
    with about_field("workload"):
        resolved = workload_for(backbone, workload, dataset=dataset, limit=limit)
    return jobs.submit(database, backbone=backbone, workload=resolved, n_trials=trials, n_workers=workers,
                       space=space, constraints=constraints, sampler=sampler, seed=seed, dtype=dtype,
                       attention=attn, objective=objective)  # fmt: skip


def cmd_submit(args) -> int:
    import jobs
    from jobs.cluster import connect_timeout

    connect_timeout(args.ray_timeout)  # a bad --ray-timeout (or $ILLAVA_RAY_CONNECT_TIMEOUT) before any job exists
    database = _database(args, create=True)
    job_id = submit_job(database, backbone=args.backbone, workload=args.workload, dataset=args.dataset,
                        limit=args.limit, trials=args.trials, workers=args.workers, reduction=args.reduction,
                        encoder_share=args.encoder_share, methods=args.methods, min_retention=args.min_retention,
                        max_memory_mib=args.max_memory_mib, max_latency_ms=args.max_latency_ms,
                        sampler=args.sampler, seed=args.seed, dtype=args.dtype, attn=args.attn,
                        objective=args.objective)  # fmt: skip
    print(job_id)
    if not args.wait:
        log = jobs.start_background(database, job_id, ray_address=args.ray_address, ray_timeout_s=args.ray_timeout)
        print(f"running in the background (log: {log}); follow with `illava-tune status {job_id[:8]}`", file=sys.stderr)
        return 0
    return _run_in_foreground(database, job_id, args)


def _run_in_foreground(database: Database, job_id: str, args) -> int:
    from tqdm.auto import tqdm

    import jobs

    bar = tqdm(total=args.trials, desc="trials", unit="trial", file=sys.stderr)

    def on_progress(p) -> None:
        bar.n = p.done
        bar.set_postfix(front=p.front_size, failed=p.failed)
        bar.refresh()

    try:
        state = jobs.run(database, job_id, ray_address=getattr(args, "ray_address", None), on_progress=on_progress,
                         force=getattr(args, "force", False), ray_timeout_s=getattr(args, "ray_timeout", None))  # fmt: skip
    finally:
        bar.close()
    print(f"job {job_id}: {state}")
    if state != "completed":
        error = jobs.status(database, job_id).error
        if error:
            print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_front(jobs.front(database, job_id)))
    latency_ms, speedup = getattr(args, "latency_ms", None), getattr(args, "speedup", None)
    if latency_ms or speedup:
        status = jobs.status(database, job_id)
        choice = jobs.best(database, backbone=status.backbone, latency_ms=latency_ms, speedup=speedup, job=job_id,
                           candidates=True)  # fmt: skip
        _print_best(choice, latency_ms=latency_ms, speedup=speedup)
    return 0


def cmd_resume(args) -> int:
    import jobs

    database = _database(args)
    job = jobs.status(database, args.job)
    args.trials = job.progress.total
    return _run_in_foreground(database, job.id, args)


def cmd_jobs(args) -> int:
    import jobs

    rows = jobs.list_jobs(_database(args))
    if not rows:
        print("no jobs yet: `illava-tune submit --backbone tiny --trials 8 --wait`")
    for job in rows:
        print(f"{job.id[:12]}  {job.state:<10} {job.backbone:<10} {job.workload:<14} {job.n_trials:>4} trials  "
              f"{job.created_at:%Y-%m-%d %H:%M}")  # fmt: skip
    return 0


def cmd_status(args) -> int:
    import jobs

    st = jobs.status(_database(args), args.job)
    p = st.progress
    eta = f", about {p.eta_s:.0f} s left" if p.eta_s is not None else ""
    print(f"job {st.id}: {st.state}; {p.done}/{p.total} trials ({p.failed} failed), front {p.front_size}, "
          f"{p.elapsed_s:.0f} s elapsed{eta}")  # fmt: skip
    if st.error:
        print(f"error: {st.error}")
    if st.driver_note:
        print(st.driver_note)
    return 0


def cmd_cancel(args) -> int:
    import jobs

    print(f"cancel requested for job {jobs.cancel(_database(args), args.job)}")
    return 0


def cmd_pareto(args) -> int:
    import jobs

    database = _database(args)
    rows = jobs.front(database, args.job)
    print(format_front(rows))
    if rows:
        out = write_plot(rows, Path(args.plot or f"pareto-{jobs.status(database, args.job).id[:8]}.png"))
        print(f"plot: {out}", file=sys.stderr)
    return 0


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Latency against quality as a PNG at `path` (and an interactive HTML beside it if plotly is there)."""
    try:
        import plotly.express as px

        fig = px.scatter(x=[r["latency_ms"] for r in rows], y=[r["quality"] for r in rows],
                         size=[r["memory_mib"] or 1 for r in rows],
                         labels={"x": "prefill latency (ms)", "y": "accuracy / fidelity"},
                         hover_name=[str(r["id"]) for r in rows])  # fmt: skip
        fig.write_html(path.with_suffix(".html"))
    except ImportError:
        pass
    path.write_bytes(front_png(rows))
    return path


def front_png(rows: list[dict[str, Any]]) -> bytes:
    """The front as a PNG (matplotlib, no display needed): latency against quality, points labelled by id."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = [r["quality"] for r in rows]
    latency = [r["latency_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(latency, quality)
    for r, x, y in zip(rows, latency, quality):
        ax.annotate(str(r["id"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("prefill latency (ms)")
    ax.set_ylabel("accuracy (or first-token agreement)")
    ax.set_title("Pareto front")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
    return out.getvalue()


def cmd_best(args) -> int:
    import jobs

    choice = jobs.best(_database(args), backbone=args.backbone, latency_ms=args.latency_ms, speedup=args.speedup,
                       hardware=args.hardware,
                       workload=args.workload, max_memory_mib=args.max_memory_mib,
                       min_retention=args.min_retention, dtype=args.dtype, attention=args.attn,
                       candidates=args.candidates)  # fmt: skip
    _print_best(choice, latency_ms=args.latency_ms, speedup=args.speedup)
    return 0


def _print_best(choice, *, latency_ms: float | None = None, speedup: float | None = None) -> None:
    import jobs

    row = choice.point.ref  # the published schedule row
    target = f"under {latency_ms:.1f} ms" if latency_ms is not None else f"at least {speedup:.2f}x faster than unmerged"
    then = (
        f"export: illava-tune export {row.id}"
        if row.status == "published"
        else f"publish: illava-tune publish {row.id}"
    )
    if choice.met:
        print(f"\nbest schedule {target}: #{row.id} ({then})")
    elif latency_ms is not None:
        print(f"\nno schedule meets {latency_ms:.1f} ms; the fastest is #{row.id}, {choice.gap_ms:.1f} ms over")
    else:
        print(f"\nno schedule is {speedup:.2f}x faster than the unmerged model (measured in the same job); the "
              f"fastest is #{row.id} at {row.speedup:.2f}x, {choice.gap_speedup:.2f}x short")  # fmt: skip
    shown = jobs.published(row)
    if shown["speedup_low"] is not None and shown["speedup_low"] <= 1.0 <= shown["speedup_high"]:
        print(f"(#{row.id}'s speedup range, {_speedup(shown)}, includes 1: on this machine it is not measurably "
              "faster than the unmerged model)")  # fmt: skip
    print(format_front([shown]))


def cmd_export(args) -> int:
    import jobs

    text = jobs.dump(jobs.manifest(_database(args), args.schedule_id), args.format)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_db(args) -> int:
    """`db upgrade | check | stamp [REVISION]`; messages name the database by its masked URL."""
    from db import head_revision

    database = Database(args.database)
    revision = getattr(args, "revision", None)
    if revision is not None and args.action != "stamp":
        raise ValueError(f"`db {args.action}` takes no revision (only `db stamp` does)")
    if args.action == "stamp":
        recorded = database.stamp(revision or "head")
        print(f"{database.masked_url}: recorded schema revision {recorded} (no migrations run)")
        if recorded != head_revision():
            print(f"run `illava-tune db upgrade` to migrate it to {head_revision()}")
        return 0
    if args.action == "upgrade":
        database.upgrade()
    else:
        database.check_schema()
    print(f"{database.masked_url}: schema up to date")
    return 0


def wait_for(database: Database, job_id: str, timeout_s: float = 600) -> str:
    """Poll until the job leaves queued/running (used by tests and scripts)."""
    import jobs

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = jobs.status(database, job_id).state
        if state not in ("queued", "running"):
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s")
