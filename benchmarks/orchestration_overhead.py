"""What the job system costs per trial: a tuning job on `tiny` (1 worker, local Ray, SQLite) vs
the profiler called directly in a loop on the same schedules, in this process.

    python benchmarks/orchestration_overhead.py               # 16 trials
    python benchmarks/orchestration_overhead.py --trials 32

Steady state = from the first trial's start to the last trial's end as the database records them
(the job's one-time costs, Ray start-up and the worker loading the model, are reported apart).
Target (issue 4): under 5% overhead per trial.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jobs  # noqa: E402
from db import Database, queries  # noqa: E402
from illava import Schedule  # noqa: E402
from optimizer import Constraints, SearchSpace  # noqa: E402
from profiler import Profiler, load_workload  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--backbone", default="tiny")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="illava-overhead-"))
    workload_file = folder / "workload.yaml"
    workload_file.write_text("name: overhead\nimage_size: [448, 448]\nsamples: 2\noutput_tokens: 4\n")
    database = Database(f"sqlite:///{folder / 'bench.db'}")
    database.upgrade()
    job_id = jobs.submit(database, backbone=args.backbone, workload=workload_file, n_trials=args.trials, n_workers=1,
                         space=SearchSpace(), constraints=Constraints())  # fmt: skip
    start = time.perf_counter()
    jobs.run(database, job_id)
    job_total = time.perf_counter() - start
    with database.session() as s:
        trials = queries.list_trials(s, queries.get_job(s, job_id), state="complete")
        schedules = [Schedule.from_dict(t.schedule) for t in trials]
        first, last = min(t.started_at for t in trials), max(t.finished_at for t in trials)
    job_steady = (last - first).total_seconds()

    workload = load_workload(workload_file)
    load_start = time.perf_counter()
    profiler = Profiler(args.backbone, repeats=3, warmup=1)  # the workers' settings
    load = time.perf_counter() - load_start
    start = time.perf_counter()
    for schedule in schedules:
        profiler.measure(schedule, workload)
    direct = time.perf_counter() - start

    n = len(schedules)
    print(f"`python benchmarks/orchestration_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(f"backbone {args.backbone}, {n} completed trials, 1 worker, local Ray, SQLite\n")
    print("| | seconds | per trial | trials per hour |")
    print("|---|---:|---:|---:|")
    print(f"| profiler in a loop | {direct:.1f} | {direct / n:.2f} | {3600 * n / direct:.0f} |")
    print(
        f"| job, first trial start to last trial end | {job_steady:.1f} | {job_steady / n:.2f} | {3600 * n / job_steady:.0f} |"
    )
    print(
        f"| job, end to end (Ray start, model load, study) | {job_total:.1f} | {job_total / n:.2f} | {3600 * n / job_total:.0f} |"
    )
    print(f"\nsteady-state overhead per trial: {job_steady / direct - 1:+.1%}; "
          f"one-time job start-up: {job_total - job_steady:.1f} s (direct model load: {load:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
