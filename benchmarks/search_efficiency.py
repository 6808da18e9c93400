"""How many trials does a search need to find the front? A grid of schedules measured once, then
every search strategy replayed against it (issue 17; results in docs/benchmarks.md).

    python benchmarks/search_efficiency.py measure --schedules 300 --limit 50   # ~6 s a schedule on a CPU
    python benchmarks/search_efficiency.py replay --seeds 50 --budgets 10,20,30,40,60 \\
        --out benchmarks/results/search/demo_replay.md

`measure` draws a space-filling design (a scrambled Halton sequence, extendable: 200 schedules are the
first 200 of 300) from the search space `illava-tune submit` searches by default, plus the seed
schedules a job starts with (the unmerged model and the paper defaults), and measures each once the
way a job's worker does (`jobs.worker.TrialWorker`: one model load, paired prefills, the job's
repeats and warm-up) on the job's default workload with `--limit` questions. One JSON line per
schedule is written as soon as it is measured, so an interrupted run resumes where it stopped; the
header line records the machine, the settings and the commit of the measuring code.

`replay` runs each strategy as a job would (`optimizer.make_study`, the same objectives, the
table's seed schedules enqueued one at a time before their asks; the `guided` strategies ask every
trial through the job's `optimizer.GuidedSearch`, which sees only what the study has been told) but
"measures" a suggested schedule by looking up the nearest schedule of the table (`Table.nearest`;
seeds match exactly) and telling the study that row's values. It reports the hypervolume of the rows visited after 10..60 trials as a
percentage of the hypervolume of the whole table's front (`Scale` says over which objectives and
against which reference point), median and range over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import illava  # noqa: E402
from illava import Schedule  # noqa: E402
from illava.backbones import backbone_config  # noqa: E402
from jobs.driver import MEASURE_REPEATS, MEASURE_WARMUP  # noqa: E402  (what a job's worker is given)
from optimizer import (  # noqa: E402
    MEMORY_NOISE,
    GuidedSearch,
    Metrics,
    Objectives,
    Point,
    SearchSpace,
    SpeedModel,
    enqueue_seed,
    hypervolume,
    make_study,
    metrics_summary,
    pareto_front,
    parse_range,
    schedule_params,
    seed_reductions,
    seed_role,
    seed_schedules,
    tell_failure,
    tell_result,
)

DEFAULT_TABLE = Path(__file__).resolve().parent / "results" / "search" / "demo_grid.jsonl"
#: The defaults of `illava-tune submit --reduction / --encoder-share` (illava_tune/cli.py).
JOB_REDUCTION, JOB_ENCODER_SHARE = "0.5:0.95", "0:0.8"
OBJECTIVES = Objectives("speedup")  # the job's default objective
FORMAT = 1  # of the table file


# ----------------------------------------------------------------------------------- the design
def _primes(count: int) -> list[int]:
    primes: list[int] = []
    candidate = 2
    while len(primes) < count:
        if all(candidate % p for p in primes if p * p <= candidate):
            primes.append(candidate)
        candidate += 1
    return primes


def halton(count: int, dims: int, seed: int, *, start: int = 1) -> np.ndarray:
    """Points `start` .. `start + count - 1` of a Halton sequence in [0, 1)^dims, every digit of every
    dimension scrambled by its own random permutation (fixed by `seed`), which removes the
    correlation plain Halton has between dimensions of large bases. The permutations do not depend
    on `count` or `start`, so consecutive calls continue one sequence."""
    rng = np.random.default_rng(seed)
    points = np.zeros((count, dims))
    indices = np.arange(start, start + count)
    for dim, base in enumerate(_primes(dims)):
        scale = 1.0 / base
        rest = indices.copy()
        for _ in range(math.ceil(40 * math.log(2) / math.log(base))):  # 40 bits of resolution
            points[:, dim] += rng.permutation(base)[rest % base] * scale
            rest //= base
            scale /= base
    return points


def _unit_params(u: Sequence[float], space: SearchSpace, encoder_depth: int, llm_depth: int) -> dict[str, Any]:
    """A point of the unit cube as the Optuna parameters `space.suggest` reads (all of them; it
    reads only those its draw needs). Dimension order: reduction, encoder_share, the encoder's
    layer count and 3 slots, the LLM's count and 3 slots, recycle_share, group_size."""

    def real(value: float, bounds: tuple) -> float:
        low, high = bounds
        return float(low + value * (high - low))

    def integer(value: float, low: int, high: int) -> int:
        return int(min(high, low + math.floor(value * (high - low + 1))))

    enc_low, enc_high = space.bounds(space.encoder_layer_count)
    llm_low, llm_high = space.bounds(space.llm_layer_count)
    params: dict[str, Any] = {
        "reduction": real(u[0], space.bounds(space.reduction)),
        "method": space.methods[0],
        "encoder_share": real(u[1], space.bounds(space.encoder_share)),
        "encoder_layer_count": integer(u[2], enc_low, enc_high),
        "llm_layer_count": integer(u[6], llm_low, llm_high),
        "recycle_share": real(u[10], space.bounds(space.recycle_share)),
        "group_size": space.group_size[integer(u[11], 0, len(space.group_size) - 1)],
    }
    for slot in range(3):
        params[f"encoder_layer_{slot}"] = integer(u[3 + slot], 0, encoder_depth - 1)
        params[f"llm_layer_{slot}"] = integer(u[7 + slot], 0, llm_depth - 2)
    return params


def schedule_key(schedule: Schedule | dict[str, Any]) -> str:
    """Identity of a schedule in the table: its canonical JSON."""
    return json.dumps(Schedule.coerce(schedule).to_dict(), sort_keys=True)


@dataclass(frozen=True)
class Candidate:
    role: str  # "unmerged", "paper_default@0.6667", or "grid"
    schedule: Schedule
    params: dict[str, Any]


def design(space: SearchSpace, *, encoder_depth: int, llm_depth: int, count: int, seed: int) -> list[Candidate]:
    """The job's seed schedules, then `count` distinct grid schedules: Halton points mapped through
    `space.suggest` (a point giving a schedule already listed is skipped and the sequence goes on),
    so the first n grid schedules of a longer design are those of a shorter one."""
    import optuna

    most = max(space.bounds(space.encoder_layer_count)[1], space.bounds(space.llm_layer_count)[1])
    if len(space.methods) != 1 or most > 3:
        raise ValueError("the design covers one method and at most 3 layers per stage (the job's default space)")
    seeds = seed_schedules(space, encoder_depth=encoder_depth, llm_depth=llm_depth, reductions=seed_reductions(space))
    out = [Candidate(seed_role(s), s, schedule_params(s, space)) for s in seeds]
    seen = {schedule_key(c.schedule) for c in out}
    index = 1
    while len(out) < len(seeds) + count:
        for u in halton(256, 12, seed, start=index):
            params = _unit_params(u, space, encoder_depth, llm_depth)
            schedule = space.suggest(optuna.trial.FixedTrial(params), encoder_depth=encoder_depth, llm_depth=llm_depth)
            if schedule_key(schedule) not in seen and len(out) < len(seeds) + count:
                seen.add(schedule_key(schedule))
                out.append(Candidate("grid", schedule, schedule_params(schedule, space)))
        index += 256
    return out


# ----------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    """One measured schedule of the table. `metrics` is `optimizer.Metrics` (None: the measurement
    failed, `error` says why)."""

    index: int
    role: str
    params: dict[str, Any]
    schedule: dict[str, Any]
    metrics: Metrics | None
    speedup_low: float | None = None
    speedup_high: float | None = None
    memory_source: str | None = None
    predicted_speedup: float | None = None  # vanilla / schedule prefill FLOPs (`illava.predicted_speedup`)
    seconds: float = 0.0
    load: float | None = None  # 1-minute load average when the measurement started
    error: str | None = None

    def to_json(self) -> str:
        data = {**self.__dict__, "metrics": None if self.metrics is None else self.metrics.to_dict()}
        return json.dumps({"kind": "row", **data})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        data = {k: v for k, v in data.items() if k != "kind"}
        metrics = data.pop("metrics")
        return cls(metrics=None if metrics is None else Metrics(**metrics), **data)

    def objectives(self) -> tuple[float, float, float]:
        """(speed, memory, quality) as minimised: minus the speedup, MiB, minus the quality."""
        speed, memory, quality = OBJECTIVES.values(self.metrics)
        return -speed, memory, -quality


@dataclass
class TableFile:
    """A table on disk: the header (what was measured, how, on what), the rows, the sessions that wrote them."""

    header: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> TableFile:
        """Every complete line of `path`; a last line cut short by an interrupted write is dropped."""
        lines = path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{path}:{number} is not JSON; only the last line may be cut short") from None
        if not records or records[0].get("kind") != "header":
            raise ValueError(f"{path} does not start with a header line: not a search_efficiency table")
        if records[0].get("format") != FORMAT:
            raise ValueError(f"{path} is table format {records[0].get('format')}, this script reads {FORMAT}")
        table = cls(records[0])
        rows: dict[str, Row] = {}  # a schedule measured again (`--redo-slower-than`): the later row stands
        for record in records[1:]:
            if record.get("kind") == "row":
                row = Row.from_json(record)
                rows.pop(schedule_key(row.schedule), None)
                rows[schedule_key(row.schedule)] = row
            elif record.get("kind") == "session":
                table.sessions.append(record)
        table.rows = sorted(rows.values(), key=lambda row: row.index)
        return table

    def space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.header["space"])


def _append(path: Path, line: str) -> None:
    with path.open("a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _rewrite_complete_lines(path: Path) -> None:
    """Drop a trailing line an interrupted write left without its newline, so appends stay valid JSONL."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1])


# ----------------------------------------------------------------------------------- measure
def _job_setup(backbone: str, reduction: str, encoder_share: str, limit: int) -> tuple[SearchSpace, Any, tuple]:
    """(the job's search space, its workload, the backbone's depths) as `illava-tune submit` makes them."""
    from illava_tune.tune import workload_for

    space = SearchSpace(reduction=parse_range(reduction), encoder_share=parse_range(encoder_share))
    return space, workload_for(backbone, None, limit=limit), illava.depths(backbone_config(backbone))


def _header(args: argparse.Namespace, space: SearchSpace, workload: Any, depths: tuple, worker: Any) -> dict:
    grids, text_tokens = worker.flop_inputs()  # what a job's guided search reads, the same way
    return {
        "kind": "header", "format": FORMAT, "backbone": args.backbone, "workload": workload.to_dict(),
        "space": space.to_dict(), "depths": list(depths), "design_seed": args.design_seed,
        "repeats": MEASURE_REPEATS, "warmup": MEASURE_WARMUP, "objective": OBJECTIVES.latency,
        "flop_inputs": {"grids": grids, "text_tokens": text_tokens},
        "hardware": worker.profiler.hardware.to_dict(), "versions": _versions(), "code": code_version(),
    }  # fmt: skip


def code_version() -> dict[str, Any]:
    """The commit the measuring code is at, and the tracked files that differ from it: a table
    measured by two versions of the engine would compare schedules across them."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        modified = [line[3:] for line in git("status", "--porcelain", "-uno").splitlines()]
        return {"commit": git("rev-parse", "HEAD").strip(), "modified": modified}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "modified": None}


def _versions() -> dict[str, str]:
    import optuna
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__}


def _session(args: argparse.Namespace, argv: Sequence[str] | None) -> str:
    command = "python benchmarks/search_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return json.dumps({"kind": "session", "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "host": platform.node(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]})  # fmt: skip


def _check_same(header: dict[str, Any], fresh: dict[str, Any], path: Path) -> None:
    keys = ("backbone", "workload", "space", "depths", "design_seed", "repeats", "warmup", "objective", "code")
    differ = [key for key in keys if header.get(key) != fresh.get(key)]
    if differ:
        raise SystemExit(
            f"{path} was measured with other settings ({', '.join(differ)} differ): resume with the same "
            "code and --backbone/--limit/--reduction/--encoder-share/--design-seed, or write to another --out"
        )


def _measure_one(worker: Any, candidate: Candidate, index: int, config: Any, flops: dict) -> Row:
    started, load = time.perf_counter(), os.getloadavg()[0]
    predicted = illava.predicted_speedup(config, candidate.schedule, flops["grids"], flops["text_tokens"])
    base = dict(index=index, role=candidate.role, params=candidate.params, schedule=candidate.schedule.to_dict(),
                predicted_speedup=predicted, load=load)  # fmt: skip
    try:
        measured = worker.evaluate(index, candidate.schedule.to_dict())
        metrics = metrics_summary(measured)
        OBJECTIVES.values(metrics)  # a measurement the job could not rank is a failed trial there too
    except Exception as error:  # noqa: BLE001 - a failed schedule is a row, as a failed trial is in a job
        return Row(metrics=None, error=f"{type(error).__name__}: {error}"[:500],
                   seconds=time.perf_counter() - started, **base)  # fmt: skip
    spread = measured.get("speedup") or {}
    return Row(metrics=metrics, speedup_low=spread.get("low"), speedup_high=spread.get("high"),
               memory_source=(measured.get("peak_memory") or {}).get("objective_source"),
               seconds=time.perf_counter() - started, **base)  # fmt: skip


def cmd_measure(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    import torch
    from tqdm.auto import tqdm

    from jobs.worker import TrialWorker

    space, workload, depths = _job_setup(args.backbone, args.reduction, args.encoder_share, args.limit)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    worker = TrialWorker(args.backbone, workload.to_dict(), device=device, repeats=MEASURE_REPEATS, warmup=MEASURE_WARMUP,
                         dtype=args.dtype, attention=args.attn)  # fmt: skip
    header = _header(args, space, workload, depths, worker)
    out = Path(args.out)
    done: set[str] = set()
    if out.exists() and out.stat().st_size:
        _rewrite_complete_lines(out)
        table = TableFile.read(out)
        _check_same(table.header, header, out)
        redo = args.redo_slower_than if args.redo_slower_than is not None else math.inf
        done = {schedule_key(row.schedule) for row in table.rows if row.seconds <= redo}
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(header) + "\n")
    candidates = design(
        space, encoder_depth=depths[0], llm_depth=depths[1], count=args.schedules, seed=args.design_seed
    )
    _append(out, _session(args, argv))
    todo = [(i, c) for i, c in enumerate(candidates) if schedule_key(c.schedule) not in done]
    print(f"{out}: {len(candidates) - len(todo)} of {len(candidates)} schedules measured already; "
          f"measuring {len(todo)} on {worker.profiler.hardware.key()}", file=sys.stderr)  # fmt: skip
    config = worker.profiler.model.config
    failed = 0
    for index, candidate in tqdm(todo, desc="schedules", unit="schedule", file=sys.stderr):
        row = _measure_one(worker, candidate, index, config, header["flop_inputs"])
        failed += row.error is not None
        _append(out, row.to_json())
    print(f"{out}: {len(candidates)} schedules, {failed} failed in this session", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- replay: lookup
def schedule_features(schedule: Schedule, space: SearchSpace, encoder_depth: int, llm_depth: int) -> np.ndarray:
    """A merged schedule as a point of [0, 1]^F for `Table.nearest`: every searched parameter scaled
    to its range in `space` (reduction, encoder_share, recycle_share; the layer counts; group_size by
    its rank among the choices), and each stage's layers as fractions of the deepest layer it may
    merge at, padded to 3 slots by repeating the last one and weighted 1/sqrt(3) each, so a stage's
    layer positions weigh as much together as one parameter (and a missing layer counts as its
    neighbour, not as position 0)."""

    def scaled(value: float, bounds: tuple) -> float:
        low, high = bounds
        return 0.0 if high == low else (float(value) - low) / (high - low)

    own = schedule.params.to_dict()
    values = [
        scaled(schedule.reduction, space.bounds(space.reduction)),
        scaled(schedule.encoder_share, space.bounds(space.encoder_share)),
        scaled(len(schedule.encoder_layers), space.bounds(space.encoder_layer_count)),
        scaled(len(schedule.llm_layers), space.bounds(space.llm_layer_count)),
        scaled(own.get("recycle_share", 0.0), space.bounds(space.recycle_share)),
        scaled(sorted(space.group_size).index(own["group_size"]) if "group_size" in own else 0,
               (0, max(len(space.group_size) - 1, 1))),
    ]  # fmt: skip
    for layers, deepest in ((schedule.encoder_layers, encoder_depth - 1), (schedule.llm_layers, llm_depth - 2)):
        padded = (list(layers) + [layers[-1]] * 3)[:3] if layers else [0, 0, 0]  # a stage the method skips
        values += [layer / max(deepest, 1) / math.sqrt(3) for layer in padded]
    return np.array(values)


class Table:
    """The measured table as a replay sees it: a suggested schedule is measured by the row of the
    same schedule (the seeds, and anything else measured exactly) or else by the merged row nearest
    to it in `schedule_features` (Euclidean). The unmerged model is only ever matched exactly: a
    search never draws it (its reduction, 0, lies outside the searched range)."""

    def __init__(self, file: TableFile):
        self.file, self.space = file, file.space()
        self.encoder_depth, self.llm_depth = file.header["depths"]
        self.rows = sorted(file.rows, key=lambda row: row.index)
        self.by_key = {schedule_key(row.schedule): row for row in self.rows}
        self.merged = [row for row in self.rows if not Schedule.from_dict(row.schedule).removes_nothing]
        self.features = np.stack([self.featurise(Schedule.from_dict(row.schedule)) for row in self.merged])

    def featurise(self, schedule: Schedule) -> np.ndarray:
        return schedule_features(schedule, self.space, self.encoder_depth, self.llm_depth)

    def nearest(self, schedule: Schedule) -> Row:
        exact = self.by_key.get(schedule_key(schedule))
        if exact is not None:
            return exact
        distances = np.linalg.norm(self.features - self.featurise(schedule), axis=1)
        return self.merged[int(np.argmin(distances))]

    def seeds(self) -> list[Schedule]:
        """The job's seed schedules, in order, as the table recorded them (`seed_schedules` of the
        code that measured it)."""
        return [Schedule.from_dict(row.schedule) for row in self.rows if row.role != "grid"]

    @property
    def measured(self) -> list[Row]:
        return [row for row in self.rows if row.metrics is not None]


# ----------------------------------------------------------------------------------- replay: hypervolume
@dataclass(frozen=True)
class Scale:
    """How the replay scores a set of rows: the hypervolume of their front, in units fixed by the table.

    Which objectives count: speed (the speedup) and quality always; memory only when it tells the
    table front's schedules apart. The table front is the job's (`optimizer.pareto_front`, which
    holds memory figures within `MEMORY_NOISE` for equal); when its memory figures spread by no
    more than that noise, memory separates nothing on it, and a hypervolume with memory as a third
    axis would turn sub-noise differences into a whole axis of volume, so memory is left out. Units:
    each objective, minimised (speed and quality negated), mapped so that the table front's best
    value is 0 and its worst 1; the reference point is 1.1 on every axis (the front's nadir plus
    10% of its extent, so the front's extreme points count too). A percentage of the front's own
    hypervolume depends on the reference point, not on the units."""

    axes: tuple[int, ...]  # indices into `Row.objectives()`: 0 speed, 1 memory, 2 quality
    ideal: tuple[float, ...]
    extent: tuple[float, ...]

    @classmethod
    def of_table(cls, rows: Sequence[Row]) -> Scale:
        """Units of this table's measured `rows`: the axes that count, its front's ideal and nadir."""
        front = job_front(rows)
        memory = [row.metrics.memory_mib for row in front]
        axes = (0, 2) if max(memory) <= min(memory) * (1 + MEMORY_NOISE) else (0, 1, 2)
        values = np.array([[row.objectives()[axis] for axis in axes] for row in front])
        ideal, nadir = values.min(axis=0), values.max(axis=0)
        extent = np.where(nadir > ideal, nadir - ideal, 1.0)
        return cls(axes, tuple(ideal.tolist()), tuple(extent.tolist()))

    @property
    def names(self) -> list[str]:
        return [("speedup", "memory", "quality")[axis] for axis in self.axes]

    def hypervolume(self, rows: Iterable[Row]) -> float:
        """Hypervolume of `rows` in these units (dominated rows add nothing), reference 1.1 on each axis."""
        points = [
            tuple((np.array([row.objectives()[a] for a in self.axes]) - self.ideal) / self.extent) for row in rows
        ]
        return hypervolume(points, (1.1,) * len(self.axes))


def job_front(rows: Sequence[Row]) -> list[Row]:
    """The measured rows on the front a job would publish: `optimizer.pareto_front` with the speedup objective."""
    points = [Point(latency_ms=row.metrics.latency_ms, memory_mib=row.metrics.memory_mib, quality=row.metrics.quality,
                    speedup=row.metrics.speedup, ref=row) for row in rows]  # fmt: skip
    return [point.ref for point in pareto_front(points, objective=OBJECTIVES.latency)]


# ----------------------------------------------------------------------------------- replay: strategies
@dataclass(frozen=True)
class Context:
    """What a strategy may know before its first trial: the space, the depths, the FLOPs model."""

    space: SearchSpace
    encoder_depth: int
    llm_depth: int
    predict: Callable[[Schedule], float]  # FLOPs-predicted speedup of a schedule (`illava.predicted_speedup`)


@dataclass(frozen=True)
class Strategy:
    """A search as a job would run it: `sampler` is the job's (`make_study(sampler=...)`), seeded the
    job's way; `make_sampler` replaces it (a sampler a job does not offer yet); `guide`, the job's
    `optimizer.GuidedSearch`, asks every trial after the seeds (what it prunes is never measured and
    counts toward nothing)."""

    name: str
    sampler: str
    about: str
    make_sampler: Callable[[int], Any] | None = None
    guide: Callable[[Context, int], GuidedSearch] | None = None


def _sampler(kind: str, **options: Any) -> Callable[[int], Any]:
    import optuna

    samplers = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler}

    def make(seed: int) -> Any:
        with warnings.catch_warnings():  # multivariate and group TPE are flagged experimental in Optuna 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return samplers[kind](seed=seed, **options)

    return make


def _guided(**options: Any) -> Callable[[Context, int], GuidedSearch]:
    def guide(context: Context, seed: int) -> GuidedSearch:
        return GuidedSearch(context.space, encoder_depth=context.encoder_depth, llm_depth=context.llm_depth,
                            flops_speedup=context.predict, seed=seed, **options)  # fmt: skip

    return guide


MULTIVARIATE = {"multivariate": True, "group": True}
EVERY_TRIAL = 10**6  # an exploration longer than any budget: every trial a guided random draw
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("tpe", "tpe", "the job's default: multi-objective TPE (independent), 10 startup trials"),
        Strategy("nsga2", "nsga2", "the job's NSGA-II, population 50 (so random search for the first 50 trials)"),
        Strategy("random", "random", "the job's random search"),
        Strategy(
            "nsga2-p10", "nsga2", "NSGA-II with a population of 10", make_sampler=_sampler("nsga2", population_size=10)
        ),
        Strategy(
            "tpe-mv",
            "tpe",
            "TPE modelling the parameters jointly (multivariate, group)",
            make_sampler=_sampler("tpe", **MULTIVARIATE),
        ),
        Strategy(
            "guided",
            "tpe",
            "the job's search (`optimizer.GuidedSearch`, defaults): 26 random draws among the schedules the "
            "calibrated speed model predicts faster than the unmerged model, then TPE with that guard",
            guide=_guided(),
        ),
        Strategy(
            "guided-x20", "tpe", "as `guided` with 16 random draws (TPE from trial 21)", guide=_guided(explore=20)
        ),
        Strategy("guided-x10", "tpe", "as `guided` with 6 random draws (TPE from trial 11)", guide=_guided(explore=10)),
        Strategy(
            "guided-x4",
            "tpe",
            "as `guided` without random draws: TPE with the guard from trial 5",
            guide=_guided(explore=4),
        ),
        Strategy(
            "guided-random",
            "tpe",
            "as `guided` with every trial a random draw (the sampler never asked)",
            guide=_guided(explore=EVERY_TRIAL),
        ),
        Strategy(
            "guided-flops",
            "tpe",
            "as `guided` with the FLOPs model uncalibrated (`calibrate=False`): it "
            "predicts every merged schedule faster, so nothing is ruled out",
            guide=_guided(calibrate=False),
        ),
    )  # fmt: skip
}


def replay(table: Table, strategy: Strategy, seed: int, budget: int, context: Context) -> list[Row]:
    """The rows a job with this strategy and seed would have measured, trial by trial."""
    space, depths = table.space, (table.encoder_depth, table.llm_depth)
    study = make_study(None, f"replay-{strategy.name}-{seed}", sampler=strategy.sampler, seed=seed,
                       objectives=OBJECTIVES)  # fmt: skip
    if strategy.make_sampler is not None:
        study.sampler = strategy.make_sampler(seed)
    seeds = table.seeds()
    guide = strategy.guide(context, seed) if strategy.guide else None
    queue = list(seeds[:budget])
    visited = []
    for _ in range(budget):
        while queue and not enqueue_seed(study, queue.pop(0), space):
            pass  # already in the study: the next one
        if guide is not None:
            trial, schedule = guide.ask(study)
        else:
            trial = study.ask()
            schedule = space.suggest(trial, encoder_depth=depths[0], llm_depth=depths[1])
        row = table.nearest(schedule)
        visited.append(row)
        if row.metrics is None:
            tell_failure(study, trial)
        else:
            tell_result(study, trial, row.metrics, objectives=OBJECTIVES)
    return visited


def hv_percent_by_budget(visited: Sequence[Row], budgets: Sequence[int], scale: Scale, full: float) -> list[float]:
    """Hypervolume of the measured rows among the first b visited, as % of the table front's, for each b."""
    out = []
    for budget in budgets:
        measured = [row for row in visited[:budget] if row.metrics is not None]
        out.append(100.0 * scale.hypervolume(measured) / full if measured else 0.0)
    return out


# ----------------------------------------------------------------------------------- replay: report
@dataclass(frozen=True)
class Result:
    """One strategy over every seed: HV% per seed at each trial count 1..max budget."""

    strategy: Strategy
    curves: list[list[float]]
    visits: list[list[Row]]

    def at(self, budget: int) -> list[float]:
        return [curve[budget - 1] for curve in self.curves]

    def distinct(self, budget: int) -> float:
        """Median over seeds of how many different table rows the first `budget` trials measured."""
        return statistics.median(len({row.index for row in visited[:budget]}) for visited in self.visits)

    def trials_to(self, percent: float) -> float | None:
        """Median over seeds of the first trial count reaching `percent` (None: half the seeds never do)."""
        firsts = [next((i + 1 for i, v in enumerate(c) if v >= percent), math.inf) for c in self.curves]
        median = statistics.median(firsts)
        return None if math.isinf(median) else median


def run_replays(table: Table, strategies: Sequence[Strategy], seeds: int, budget: int, context: Context,
                progress: Callable[[Iterable], Iterable] = lambda items: items) -> list[Result]:  # fmt: skip
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "study created" line per replay otherwise
    scale = Scale.of_table(table.measured)
    full = scale.hypervolume(table.measured)
    results = []
    for strategy in strategies:
        curves, visits = [], []
        for seed in progress(range(seeds)):
            visits.append(replay(table, strategy, seed, budget, context))
            curves.append(hv_percent_by_budget(visits[-1], range(1, budget + 1), scale, full))
        results.append(Result(strategy, curves, visits))
    return results


def flops_context(table: Table) -> Context:
    """The FLOPs model on the batch the table's measurements timed (from its header)."""
    config = backbone_config(table.file.header["backbone"])
    flops = table.file.header["flop_inputs"]
    cache: dict[str, float] = {}

    def predict(schedule: Schedule) -> float:
        key = schedule_key(schedule)
        if key not in cache:
            cache[key] = illava.predicted_speedup(config, schedule, flops["grids"], flops["text_tokens"])
        return cache[key]

    return Context(table.space, table.encoder_depth, table.llm_depth, predict)


def report(
    table: Table, results: Sequence[Result], budgets: Sequence[int], *, command: str, goals: Sequence[float]
) -> str:
    header = table.file.header
    scale = Scale.of_table(table.measured)
    front = job_front(table.measured)
    failed = len(table.rows) - len(table.measured)
    measured_by = table.file.sessions[0]["command"] if table.file.sessions else "?"
    lines = [
        f"`{command}`",
        "",
        f"table: {len(table.rows)} schedules ({failed} failed) of `{header['backbone']}` on "
        f"`{header['workload']['name']}` ({header['workload']['samples']} questions), measured on "
        f"{_machine(header)} at commit {str((header.get('code') or {}).get('commit'))[:7]} by `{measured_by}`; its "
        f"front (the job's rule) has {len(front)} schedules. Hypervolume over "
        f"{', '.join(scale.names)} (memory counts only when the front's figures differ by more than "
        f"{MEMORY_NOISE:.0%}), in units where the front spans 0..1 on each axis, reference point 1.1 on each.",
        "",
        *summary(table),
        "",
        "| strategy | "
        + " | ".join(f"{b} trials" for b in budgets)
        + "".join(f" | trials to {goal:g}%" for goal in goals)
        + f" | rows measured in {max(budgets)} trials |",
        "|---|" + "---:|" * (len(budgets) + len(goals) + 1),
    ]
    for result in results:
        cells = [_cell(result.at(b)) for b in budgets]
        cells += [_trials(result.trials_to(goal), max(budgets)) for goal in goals]
        cells.append(f"{result.distinct(max(budgets)):g}")
        lines.append(f"| {result.strategy.name} | " + " | ".join(cells) + " |")
    seeds = [row for row in table.measured if row.role != "grid"]
    alone = 100.0 * scale.hypervolume(seeds) / scale.hypervolume(table.measured)
    lines += [
        "",
        f"HV% of the table front's hypervolume: median (min-max) over {len(results[0].curves)} seeds. The job's "
        f"{len(seeds)} seed schedules alone (its first {len(seeds)} trials, the same in every strategy) reach "
        f"{alone:.1f}%.",
        "",
    ]
    lines += [f"- `{r.strategy.name}`: {r.strategy.about}" for r in results]
    return "\n".join(lines)


def summary(table: Table) -> list[str]:
    """What the table holds that decides what a search has to find: how often a merge pays, how
    well the FLOPs model ranks schedules, and the front (the job's rule)."""
    merged = [row for row in table.measured if not Schedule.from_dict(row.schedule).removes_nothing]
    speedups = np.array([row.metrics.speedup for row in merged])
    faster = [row for row in merged if row.metrics.speedup > 1]
    one_block = sum(len(Schedule.from_dict(row.schedule).encoder_layers) == 1 for row in faster)
    encoder_heavy = sum(Schedule.from_dict(row.schedule).encoder_share >= 0.45 for row in faster)
    predicted = np.array([row.predicted_speedup for row in merged], dtype=float)
    spread = [(row.speedup_high - row.speedup_low) / row.metrics.speedup for row in merged if row.speedup_low]
    front = job_front(table.measured)
    memory = [row.metrics.memory_mib for row in front]
    lines = [
        f"Merged schedules: median speedup {np.median(speedups):.2f}x; {len(faster)} of {len(merged)} faster than "
        f"the unmerged model (fastest {speedups.max():.2f}x), {one_block} of them merging in one encoder block and "
        f"{encoder_heavy} doing >= 45% of the removal in the encoder. FLOPs-predicted speedup "
        f"{predicted.min():.2f}-{predicted.max():.2f}x, correlation with the measured r = "
        f"{np.corrcoef(predicted, speedups)[0, 1]:.2f}. Paired speedup range (max - min of the rounds) / median: "
        f"median {f'{np.median(spread):.1%}' if spread else 'not recorded'}. The front's memory figures differ by "
        f"{max(memory) / min(memory) - 1:.2%}.",
        *speed_model_summary(table),
        "",
        "| row | speedup (paired range) | memory MiB | quality | schedule |",
        "|---|---:|---:|---:|---|",
    ]
    for row in front:
        what = Schedule.from_dict(row.schedule).describe()
        lines.append(
            f"| {row.index} | {row.metrics.speedup:.3f} ({row.speedup_low or 0:.2f}-{row.speedup_high or 0:.2f}) | "
            f"{row.metrics.memory_mib:.2f} | {row.metrics.quality:.0%} | {what} |"
        )
    return lines


def speed_model_summary(table: Table) -> list[str]:
    """How the job's speed model (`optimizer.SpeedModel`), fitted on the seeds alone as a job's is
    after its first trials, ranks the grid's schedules, beside the FLOPs model; nothing when the
    table lacks the FLOPs predictions."""
    if any(row.predicted_speedup is None for row in table.measured):
        return []
    flops = {schedule_key(row.schedule): row.predicted_speedup for row in table.measured}
    seeds = [(Schedule.from_dict(row.schedule), row.metrics.speedup) for row in table.measured if row.role != "grid"]
    model = SpeedModel.fit(lambda schedule: flops[schedule_key(schedule)], seeds)
    grid = [row for row in table.measured if row.role == "grid"]
    measured = np.array([row.metrics.speedup for row in grid])
    calibrated = np.array([model.speedup(Schedule.from_dict(row.schedule)) for row in grid])
    by_flops = np.array([row.predicted_speedup for row in grid])

    def rank_correlation(predicted: np.ndarray) -> float:
        return float(np.corrcoef(np.argsort(np.argsort(predicted)), np.argsort(np.argsort(measured)))[0, 1])

    passed, faster = calibrated >= 1.0, measured > 1.0
    return [
        f"The speed model fitted on the {model.fitted_on} merged seeds: {model.per_merge:.3f} of the unmerged prefill "
        f"per merge step; on the {len(grid)} grid schedules its rank correlation with the measured speedup is "
        f"{rank_correlation(calibrated):.2f} (the FLOPs model's {rank_correlation(by_flops):.2f}), and it predicts "
        f"{passed.sum()} faster than the unmerged model, {(passed & faster).sum()} of the {faster.sum()} that are "
        f"(the FLOPs model: {(by_flops >= 1.0).sum()}, {((by_flops >= 1.0) & faster).sum()})."
    ]


def _trials(first: float | None, most: int) -> str:
    return f"> {most}" if first is None else f"{first:g}"


def _cell(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f}% ({min(values):.1f}-{max(values):.1f})"


def _machine(header: dict[str, Any]) -> str:
    hardware = header["hardware"]
    where = (
        f"{hardware.get('name')} x{hardware.get('threads')}" if hardware.get("kind") == "cpu" else hardware.get("name")
    )
    return f"{hardware.get('kind')} {where} ({hardware.get('dtype')}, {hardware.get('attention')})"


def cmd_replay(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    from tqdm.auto import tqdm

    table = Table(TableFile.read(Path(args.table)))
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    names = args.strategies.split(",") if args.strategies else list(STRATEGIES)
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    strategies = [STRATEGIES[name] for name in names]
    progress = lambda items: tqdm(items, desc="seeds", unit="seed", file=sys.stderr, leave=False)  # noqa: E731
    results = run_replays(table, strategies, args.seeds, max(budgets), flops_context(table), progress)
    command = "python benchmarks/search_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    goals = [float(goal) for goal in args.goals.split(",")]
    text = report(table, results, budgets, command=command, goals=goals)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


# ----------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="measure the grid once (resumes an interrupted run)")
    measure.add_argument("--schedules", type=int, default=300, help="grid schedules besides the job's seeds")
    measure.add_argument("--limit", type=int, default=50, help="questions per measurement (the README's main command)")
    measure.add_argument("--backbone", default="demo")
    measure.add_argument("--reduction", default=JOB_REDUCTION, help="the searched range, as `submit --reduction`")
    measure.add_argument("--encoder-share", default=JOB_ENCODER_SHARE, help="as `submit --encoder-share`")
    measure.add_argument("--design-seed", type=int, default=0, help="scrambling of the Halton design")
    measure.add_argument("--device", help="default: cuda when available, else cpu (what a job's workers use)")
    measure.add_argument("--dtype", default="float32")
    measure.add_argument("--attn", default="sdpa")
    measure.add_argument("--out", default=str(DEFAULT_TABLE))
    measure.add_argument(
        "--redo-slower-than", type=float, metavar="SECONDS",
        help="measure again the rows that took longer than this (a machine that was busy meanwhile)",
    )  # fmt: skip
    measure.set_defaults(run=cmd_measure)

    replay = commands.add_parser("replay", help="replay the search strategies against a measured table")
    replay.add_argument("--table", default=str(DEFAULT_TABLE))
    replay.add_argument("--seeds", type=int, default=10)
    replay.add_argument("--budgets", default="10,20,30,40,60", help="trial counts to report, comma-separated")
    replay.add_argument("--strategies", help=f"comma-separated, default all: {', '.join(STRATEGIES)}")
    replay.add_argument("--goals", default="85,90", help="HV%%s whose first trial count (median) is reported")
    replay.add_argument("--out", help="also write the Markdown report here")
    replay.set_defaults(run=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return args.run(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
