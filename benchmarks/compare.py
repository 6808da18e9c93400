"""Every registered reduction method at the paper's ratios, side by side: the shape of the paper's
Tables 1 and 6 (each method on its own stages) and of its Table 5 (the paper's placement and
budget, only the merge rule swapped).

    python benchmarks/compare.py                                   # every registered method, 66.7/77.8/88.9%
    python benchmarks/compare.py --markdown docs/benchmarks.md --plot out/compare.png
    python benchmarks/compare.py --methods illava fastv --limit 50 --rounds 3   # a quick look
    python benchmarks/compare.py --skip-speed                      # accuracy only (from the cache where it can)
    python benchmarks/compare.py --fresh --methods visionzip       # recompute one method's accuracy
    python benchmarks/compare.py --stages --skip-speed              # also the encoder-only and LLM-only tables
    python benchmarks/compare.py --skip-speed --limit 128 --recheck 128   # are the cached answers still today's?

Which methods: those registered in `illava.methods` when the script runs (`--methods` picks some),
plus a row of their own for a method's boolean variant flags (`VARIANT_FLAGS`: `illava` with
``text_guided=True``). Each is placed the way seeds and comparisons place a method:
``get_method(m).placement(Schedule.paper_default(r, <the backbone's depths>))`` -- iLLaVA's default
moved onto the stages the method acts at (FastV: after one LLM layer; DivPrune, VisionZip: all
before the LLM). A method that cannot be placed is skipped with its reason printed. ``downsample``
merges nothing: its inputs are built for its schedule (`build_inputs(..., schedule=...)`, `choose(...,
schedule=...)` resize each image to the plan's token budget) and the model runs unmerged; its
speedup is paired with the unmerged model on the full-resolution image, like every other's.

`--stages` adds two tables of the Table 5 shape that more methods can take than the paper's 40/60
split: the paper's placement with *all* of the removal in its encoder blocks (``encoder_share=1``,
no LLM layers: iLLaVA, ToMe, prune, random), and with all of it after its LLM layers
(``encoder_share=0``, no encoder blocks: iLLaVA and its text-guided variant, PyramidDrop, SparseVLM,
prune, random). A method that cannot act there is listed with its reason (FastV merges after one LLM
layer only; DivPrune, VisionZip and downsample act between encoder and LLM or on the input; a variant
flag of another stage would repeat its method's row). In these tables "minus random" is against
random dropping at the same one-stage placement.

Accuracy: the trained `demo` backbone on the demo VQA test questions (`--limit`, 500 by default),
scored by option text, as `benchmarks/demo_accuracy.py` scores them; retention = accuracy / the
unmerged accuracy. Random dropping, with the paper's placement, is the baseline: its accuracy is
the mean over `--seeds` seeds, and every other row gets a 95% paired bootstrap interval over
questions of its accuracy minus that mean (`demo_accuracy.versus_random`). Each evaluation (one
schedule on all questions, ~45 s on a 2-core CPU for 500) is appended to `--cache` as one JSON line:
its per-question 0/1 vector, the schedule, the checkpoint's sha256, the questions' fingerprint, the
scoring setup, and the commit of the code. A rerun reads what matches and computes only what is
missing; `--fresh` recomputes the rows `--methods` names (with no `--methods`: everything, the
unmerged model included). A cached row measured at another commit is used, and the report names
the commits its rows come from; `--recheck N` re-scores every row it reads from the cache on the
first N questions with the code as it is now and reports each question whose answer changed (how to
tell whether a cached table still holds after the engine changed, at N/500 of the cost).

Speed: prefill (one forward, ``logits_to_keep=1``) of one prompt with one synthetic `--size` image
on `small`, each schedule placed on that model's depths. In every round each schedule runs right
after the unmerged reference on the same input (the pairing `profiler.Profiler` uses); the order of
the schedules rotates from round to round. Speedup = median (min-max) of the per-round ratios; the
unmerged model paired with itself gives the noise floor. Timings are never cached: a speedup only
means something against a reference timed in the same run.

Prints markdown tables; `--markdown FILE` appends them with the command and machine; `--plot PNG`
draws accuracy against speedup, one curve per method through its ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import illava  # noqa: E402
from benchmarks.demo_accuracy import machine, score_schedule, versus_random  # noqa: E402
from benchmarks.search_efficiency import code_version, schedule_key  # noqa: E402
from illava import PAPER_REDUCTIONS, Schedule  # noqa: E402
from illava.backbones import (  # noqa: E402
    TRAINED_BACKBONES,
    Backbone,
    backbone_config,
    builtin_names,
    load_backbone,
    tokenizer_fingerprint,
)
from illava.errors import ScheduleError  # noqa: E402
from illava.inputs import Sample, build_inputs, synthetic_image  # noqa: E402
from illava.methods import STAGES, get_method  # noqa: E402
from illava.methods.downsample import DownsampleWarning  # noqa: E402
from profiler import Timing, paired_ratios, time_once  # noqa: E402
from profiler.accuracy import answer_style  # noqa: E402
from profiler.demo_vqa import DEFAULT_IMAGE_SIZE, demo_split, fingerprint  # noqa: E402
from profiler.hardware import resolve_device  # noqa: E402
from profiler.items import MCQItem  # noqa: E402

DEFAULT_CACHE = Path(__file__).resolve().parent / "results" / "compare" / "demo_accuracy.jsonl"
CACHE_FORMAT = 1
#: Boolean parameters (default False) that make a variant of their method a row of its own, and the
#: suffix of that row's name: ``illava+text-guided``.
VARIANT_FLAGS = {"text_guided": "text-guided"}
#: The stage a variant flag changes: in a one-stage table of another stage its variant would repeat
#: its method's row, so it is left out there.
FLAG_STAGES = {"text_guided": "llm"}
#: `--stages`: the paper's placement with all of the removal at one of its stages.
STAGE_TABLES = {"encoder": "in its encoder blocks", "llm": "after its LLM layers"}
BASELINE = "random"
PROMPT = "<image> What shapes are in this picture, and what colour is each one?"
VANILLA = Schedule.vanilla()


# ----------------------------------------------------------------------------------- what is compared
@dataclass(frozen=True)
class Variant:
    """One row: a registered method with some of its parameters set."""

    method: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.method + "".join(f"+{VARIANT_FLAGS.get(name, name)}" for name, _ in self.params)

    def placed(self, reduction: float, depths: tuple[int, int]) -> Schedule:
        """The paper's default at `reduction`, moved onto the stages this method acts at."""
        paper = Schedule.paper_default(reduction, encoder_depth=depths[0], llm_depth=depths[1])
        return get_method(self.method).placement(paper).with_(**dict(self.params))

    def at_paper_placement(self, reduction: float, depths: tuple[int, int]) -> Schedule:
        """The paper's default at `reduction` with only the merge rule swapped (Table 5)."""
        paper = Schedule.paper_default(reduction, encoder_depth=depths[0], llm_depth=depths[1])
        return paper.with_(method=self.method, **dict(self.params))

    def in_one_stage(self, stage: str, reduction: float, depths: tuple[int, int]) -> Schedule:
        """The paper's default at `reduction` with all of the removal at its encoder blocks
        (``stage="encoder"``) or after its LLM layers (``"llm"``), only the merge rule swapped."""
        if not get_method(self.method).acts_at(stage):
            raise ScheduleError(f"method {self.method!r} does not merge {STAGE_TABLES[stage]}")
        other = [name for name, _ in self.params if FLAG_STAGES.get(name, stage) != stage]
        if other:
            raise ScheduleError(
                f"{other[0]} acts at the {FLAG_STAGES[other[0]]} stage only: here it would repeat {self.method}"
            )
        paper = Schedule.paper_default(reduction, encoder_depth=depths[0], llm_depth=depths[1])
        one_stage = {
            "encoder": dict(encoder_share=1.0, llm_layers=()),
            "llm": dict(encoder_share=0.0, encoder_layers=()),
        }
        return paper.with_(method=self.method, **one_stage[stage], **dict(self.params))


def registered_variants() -> list[Variant]:
    """Every registered method, and its `VARIANT_FLAGS` variants, in registration order."""
    variants = []
    for name in illava.method_names():
        variants.append(Variant(name))
        for flag in dataclasses.fields(get_method(name).params_type):
            if flag.name in VARIANT_FLAGS and flag.default is False:
                variants.append(Variant(name, ((flag.name, True),)))
    return variants


def select_variants(names: Sequence[str] | None) -> list[Variant]:
    """The variants `--methods` names (all registered ones when None), the baseline always among them."""
    known = {variant.label: variant for variant in registered_variants()}
    if names:
        unknown = [name for name in names if name not in known]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; registered: {', '.join(known)}")
        chosen = [known[name] for name in dict.fromkeys(names)]
    else:
        chosen = list(known.values())
    if BASELINE not in [variant.label for variant in chosen]:
        chosen.append(known[BASELINE])  # every row is compared with it
    return chosen


@dataclass
class Grid:
    """Every (variant, ratio) cell's schedule on one backbone, or why it has none."""

    depths: tuple[int, int]
    placed: dict[tuple[str, float], Schedule | str] = field(default_factory=dict)
    paper: dict[tuple[str, float], Schedule | str] = field(default_factory=dict)
    #: `--stages`: the paper's placement with all of the removal at one stage (`Variant.in_one_stage`).
    encoder: dict[tuple[str, float], Schedule | str] = field(default_factory=dict)
    llm: dict[tuple[str, float], Schedule | str] = field(default_factory=dict)

    @classmethod
    def build(cls, variants: Sequence[Variant], ratios: Sequence[float], depths: tuple[int, int], *,
              stages: bool = False) -> Grid:  # fmt: skip
        grid = cls(depths)
        for variant in variants:
            makers = [(grid.placed, variant.placed), (grid.paper, variant.at_paper_placement)]
            if stages:
                makers += [
                    (getattr(grid, stage), functools.partial(variant.in_one_stage, stage)) for stage in STAGE_TABLES
                ]
            for ratio in ratios:
                for table, make in makers:
                    try:
                        table[variant.label, ratio] = make(ratio, depths)
                    except ScheduleError as error:
                        table[variant.label, ratio] = str(error).removeprefix("invalid schedule: ")
        return grid

    def tables(self) -> Iterator[dict[tuple[str, float], Schedule | str]]:
        yield from (self.placed, self.paper, self.encoder, self.llm)

    def schedules(self) -> list[Schedule]:
        """Every distinct schedule of the grid, in order."""
        cells = [cell for table in self.tables() for cell in table.values()]
        found = {schedule_key(s): s for s in cells if isinstance(s, Schedule)}
        return list(found.values())


def seeds_of(schedule: Schedule, seeds: int) -> list[Schedule]:
    """The schedules whose accuracies make up a cell: the baseline's over its seeds, else itself."""
    if schedule.method == BASELINE:
        return [schedule.with_(seed=seed) for seed in range(seeds)]
    return [schedule]


# ----------------------------------------------------------------------------------- accuracy, cached
def checkpoint_identity(name: str) -> dict[str, Any]:
    """What makes two runs' weights the same, wherever the checkout is: the sha256 of a checkpoint
    directory's files (names and bytes), or, for a seeded built-in, its name, seed and tokenizer with
    the torch version that drew the weights."""
    path = TRAINED_BACKBONES.get(name) or (None if name in builtin_names() else Path(name))
    if path is None:
        return {"builtin": name, "seed": 0, "tokenizer": tokenizer_fingerprint(), "torch": torch.__version__}
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file()):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"sha256": digest.hexdigest()}


@dataclass
class AccuracyCache:
    """`--cache`: one JSON line per evaluation; a later line for the same key wins (`--fresh`)."""

    path: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @staticmethod
    def key(identity: dict[str, Any], schedule: Schedule) -> str:
        return json.dumps([identity, schedule_key(schedule)], sort_keys=True)

    @classmethod
    def read(cls, path: Path, log: Callable[[str], None]) -> AccuracyCache:
        cache = cls(path)
        if not path.exists():
            return cache
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                cache.rows[cls.key(row["identity"], Schedule.from_dict(row["schedule"]))] = row
            except (ValueError, KeyError, ScheduleError) as error:  # a torn last line, or a method gone
                log(f"{path}:{number}: not used ({type(error).__name__}: {str(error)[:120]})")
        return cache

    def get(self, identity: dict[str, Any], schedule: Schedule) -> dict[str, Any] | None:
        return self.rows.get(self.key(identity, schedule))

    def add(self, row: dict[str, Any]) -> None:
        self.rows[self.key(row["identity"], Schedule.from_dict(row["schedule"]))] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


@dataclass
class Evaluation:
    hits: np.ndarray  # (questions,) 0/1
    cached: bool
    commit: str | None


@dataclass
class Accuracy:
    """Accuracy results by schedule key, and how they came about."""

    backbone: str
    questions: int
    seeds: int
    identity: dict[str, Any]
    results: dict[str, Evaluation | str] = field(default_factory=dict)  # str: why it failed
    seconds: float = 0.0
    rechecks: list[Recheck] = field(default_factory=list)  # `--recheck`

    def hits(self, schedule: Schedule) -> list[np.ndarray] | str:
        """The 0/1 vectors making up a cell (the baseline's seeds), or why there are none."""
        found = [self.results[schedule_key(s)] for s in seeds_of(schedule, self.seeds)]
        failed = [f for f in found if isinstance(f, str)]
        return failed[0] if failed else [f.hits for f in found]

    @property
    def unmerged(self) -> np.ndarray:
        result = self.results[schedule_key(VANILLA)]
        if isinstance(result, str):
            raise SystemExit(f"the unmerged model's evaluation failed, so nothing can be compared: {result}")
        return result.hits


@dataclass
class Recheck:
    """One cached evaluation re-scored now on the first questions (`--recheck`)."""

    schedule: Schedule
    commit: str | None  # the commit the cached row was measured at
    cached: np.ndarray  # its first answers, 0/1
    now: np.ndarray | str  # the same questions scored now (str: why that failed)

    @property
    def changed(self) -> list[int]:
        """The questions whose answer changed (all of them when re-scoring failed)."""
        if isinstance(self.now, str):
            return list(range(len(self.cached)))
        return [int(i) for i in np.flatnonzero(self.cached != self.now)]


def fresh_keys(args: argparse.Namespace, grid: Grid) -> set[str]:
    """What `--fresh` recomputes: the schedules of the rows `--methods` names (all rows and the
    unmerged model without it); the baseline's and the unmerged model's only when named."""
    named = set(args.methods) if args.methods else {label for label, _ in grid.placed}
    cells = [cell for table in grid.tables() for (label, _), cell in table.items() if label in named]
    keys = {schedule_key(s) for cell in cells if isinstance(cell, Schedule) for s in seeds_of(cell, args.seeds)}
    return keys | ({schedule_key(VANILLA)} if not args.methods else set())


def run_accuracy(args: argparse.Namespace, grid: Grid, log: Callable[[str], None]) -> Accuracy:
    """Every accuracy the grid needs, from the cache or computed (the model is loaded only then)."""
    items = demo_split("test", args.limit)
    config = backbone_config(args.backbone)
    identity = {
        "checkpoint": checkpoint_identity(args.backbone),
        "questions": {"split": "test", "n": len(items), "image_size": DEFAULT_IMAGE_SIZE, "fingerprint": fingerprint(items)},
        # answer_style reads only the model's config
        "setup": {"score": answer_style(SimpleNamespace(config=config)), "batch_size": args.batch_size,
                  "device": resolve_device(args.device).type, "dtype": "float32", "attention": args.attn},
    }  # fmt: skip
    accuracy = Accuracy(args.backbone, len(items), args.seeds, identity)
    cache = AccuracyCache.read(args.cache, log)
    wanted = {schedule_key(s): s for s in [VANILLA] + [x for s in grid.schedules() for x in seeds_of(s, args.seeds)]}
    fresh = fresh_keys(args, grid) if args.fresh else set()
    todo = []
    for key, schedule in wanted.items():
        row = None if key in fresh else cache.get(identity, schedule)
        if row is None:
            todo.append(schedule)
        else:
            hits = np.array([float(c) for c in row["hits"]])
            accuracy.results[key] = Evaluation(hits, cached=True, commit=(row.get("code") or {}).get("commit"))
    log(f"accuracy on {args.backbone}, {len(items)} questions: {len(wanted) - len(todo)} of {len(wanted)} "
        f"evaluations from {args.cache}, {len(todo)} to run")  # fmt: skip
    start = time.perf_counter()
    if todo or args.recheck:
        backbone = load_backbone(args.backbone, attn_implementation=args.attn)
        backbone.model.to(resolve_device(args.device))
        scorer = Scorer(backbone, items, args.batch_size, identity, cache, code_version(), machine(args.device))
    if args.recheck:
        accuracy.rechecks = recheck(scorer, accuracy, args.recheck, log)
    for done, schedule in enumerate(todo, 1):
        accuracy.results[schedule_key(schedule)] = scorer.evaluate(schedule)
        elapsed = time.perf_counter() - start
        log(f"  [{done}/{len(todo)}] {short(schedule)}: {cell_of(accuracy.results[schedule_key(schedule)])} "
            f"({elapsed / done:.0f} s each, ~{elapsed / done * (len(todo) - done) / 60:.1f} min left)")  # fmt: skip
    accuracy.seconds = time.perf_counter() - start
    return accuracy


def recheck(scorer: Scorer, accuracy: Accuracy, n: int, log: Callable[[str], None]) -> list[Recheck]:
    """Every evaluation `accuracy` read from the cache, re-scored now on its first `n` questions."""
    cached = [(key, r) for key, r in accuracy.results.items() if isinstance(r, Evaluation) and r.cached]
    log(f"recheck: {len(cached)} cached evaluations on their first {n} questions")
    found = []
    for done, (key, result) in enumerate(cached, 1):
        schedule = Schedule.from_dict(json.loads(key))
        try:
            with inputs_carry_downsampling():
                merged = None if schedule.removes_nothing else schedule
                now = score_schedule(scorer.backbone, scorer.items[:n], merged, scorer.batch_size)
        except Exception as error:  # noqa: BLE001 - reported as a changed row, not the end of the run
            now = f"{type(error).__name__}: {error}"[:300]
        found.append(Recheck(schedule, result.commit, result.hits[:n], now))
        log(f"  [{done}/{len(cached)}] {short(schedule)}: {len(found[-1].changed)} of {n} answers changed")
    return found


def recheck_report(rechecks: list[Recheck], n: int) -> list[str]:
    """What `--recheck` found: one line, and one more per evaluation whose answers changed."""
    changed = [r for r in rechecks if r.changed]
    commits = sorted({(r.commit or "unknown")[:7] for r in rechecks})
    lines = [f"Recheck: {len(rechecks)} cached evaluations (measured at {', '.join(commits) or '-'}) re-scored on "
             f"their first {n} questions at commit {commit_note(code_version())}: "
             + (f"{len(changed)} differ." if changed else "every answer is the same.")]  # fmt: skip
    for r in changed:
        if isinstance(r.now, str):
            lines.append(f"- {short(r.schedule)}: failed now: {r.now}")
        else:
            lines.append(f"- {short(r.schedule)}: {len(r.changed)} answers changed (questions {r.changed[:10]}), "
                         f"{r.cached.mean():.1%} cached, {r.now.mean():.1%} now")  # fmt: skip
    return lines


@dataclass
class Scorer:
    """Scores schedules on the questions and appends each result to the cache."""

    backbone: Backbone
    items: list[MCQItem]
    batch_size: int
    identity: dict[str, Any]  # the cache key's part that is not the schedule
    cache: AccuracyCache
    code: dict[str, Any]  # `code_version()`
    machine: str

    def evaluate(self, schedule: Schedule) -> Evaluation | str:
        """One schedule on every question, cached; a failure is returned (a cell of the table), not cached."""
        started = time.perf_counter()
        try:
            with inputs_carry_downsampling():
                merged = None if schedule.removes_nothing else schedule
                hits = score_schedule(self.backbone, self.items, merged, self.batch_size)
        except Exception as error:  # noqa: BLE001 - one method failing must not end a long run
            return f"{type(error).__name__}: {error}"[:300]
        self.cache.add({
            "format": CACHE_FORMAT, "identity": self.identity, "schedule": schedule.to_dict(),
            "accuracy": float(hits.mean()), "hits": "".join(str(int(h)) for h in hits),
            "seconds": round(time.perf_counter() - started, 2), "code": self.code,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "machine": self.machine, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        })  # fmt: skip
        return Evaluation(hits, cached=False, commit=self.code.get("commit"))


def cell_of(result: Evaluation | str) -> str:
    return result if isinstance(result, str) else f"{result.hits.mean():.1%}"


# ----------------------------------------------------------------------------------- speed, paired
@dataclass
class Speed:
    """One schedule's timed prefills and the unmerged reference's of the same rounds (seconds)."""

    merged: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    predicted: float | None = None  # FLOPs: unmerged over merged

    @property
    def ratios(self) -> Timing:
        return paired_ratios(Timing(tuple(self.reference)), Timing(tuple(self.merged)))


@dataclass
class SpeedRun:
    backbone: str
    results: dict[str, Speed | str]  # str: why the schedule could not run
    seconds: float


def speed_batch(backbone: Backbone, schedule: Schedule, size: int, device: torch.device):
    """The prompt every schedule is timed on, built for it: a ``downsample`` schedule's image resized."""
    return build_inputs(backbone, [Sample(PROMPT, [synthetic_image(size, 0)])], schedule=schedule).to(device)


@contextmanager
def inputs_carry_downsampling() -> Iterator[None]:
    """`illava.apply` warns that a downsample schedule leaves the model as it is and that the inputs
    must change; here they do (`build_inputs(..., schedule=...)`, `choose(..., schedule=...)`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DownsampleWarning)
        yield


@torch.inference_mode()
def run_speed(args: argparse.Namespace, grid: Grid, log: Callable[[str], None]) -> SpeedRun:
    device = resolve_device(args.device)
    backbone = load_backbone(args.speed_backbone, attn_implementation=args.attn)
    model = backbone.model.to(device).eval()
    schedules = [VANILLA, *grid.schedules()]  # the first: the unmerged model against itself
    batches = {schedule_key(s): speed_batch(backbone, s, args.size, device) for s in schedules}
    reference = batches[schedule_key(VANILLA)]
    grids, text_tokens = backbone.adapter.flop_inputs(model.config, reference)  # full resolution, for every schedule

    def prefill(batch) -> Callable[[], object]:
        return lambda: model(**batch, logits_to_keep=1)

    def use(schedule: Schedule) -> None:
        with inputs_carry_downsampling():
            illava.apply_reference(model) if schedule.removes_nothing else illava.apply(model, schedule)

    results: dict[str, Speed | str] = {}
    for schedule in schedules:  # one untimed forward each: lazy set-up stays out, a failure is reported
        key = schedule_key(schedule)
        try:
            use(schedule)
            prefill(batches[key])()
            results[key] = Speed(predicted=illava.predicted_speedup(model.config, schedule, grids, text_tokens))
        except Exception as error:  # noqa: BLE001 - a cell of the table, not the end of the run
            results[key] = f"{type(error).__name__}: {error}"[:300]
    timed = [s for s in schedules if isinstance(results[schedule_key(s)], Speed)]
    start = time.perf_counter()
    for run in range(args.warmup + args.rounds):  # apply / apply_reference switch outside the timed calls
        shift = run % len(timed)
        for schedule in timed[shift:] + timed[:shift]:
            use(VANILLA)
            before = time_once(prefill(reference), device)
            use(schedule)
            seconds = time_once(prefill(batches[schedule_key(schedule)]), device)
            if run >= args.warmup:
                results[schedule_key(schedule)].reference.append(before)
                results[schedule_key(schedule)].merged.append(seconds)
        log(f"  speed on {args.speed_backbone}: round {run + 1}/{args.warmup + args.rounds} "
            f"({len(timed)} schedules, {time.perf_counter() - start:.0f} s)")  # fmt: skip
    illava.remove(model)
    return SpeedRun(args.speed_backbone, results, time.perf_counter() - start)


def speed_cell(result: Speed | str | None) -> str:
    if result is None:
        return "—"
    if isinstance(result, str):
        return f"failed: {result}"
    ratios = result.ratios
    return f"{ratios.median:.2f}x ({ratios.low:.2f}-{ratios.high:.2f})"


# ----------------------------------------------------------------------------------- tables
def where(schedule: Schedule) -> str:
    """Where a schedule removes tokens, in a few characters: ``E[1, 2, 3] 40% + L[0, 1, 3]``; ``input``
    for a method that merges at no stage but resizes the input (``downsample``)."""
    method = schedule.reduction_method
    if not any(method.acts_at(stage) for stage in STAGES):
        return "input 100%"
    before = "between" if method.encoder_stage == "between" else f"E{list(schedule.encoder_layers)}"
    if schedule.encoder_share == 1:
        return f"{before} 100%"
    if schedule.encoder_share == 0:
        return f"L{list(schedule.llm_layers)} 100%"
    return f"{before} {schedule.encoder_share:.0%} + L{list(schedule.llm_layers)}"


def speed_row(removed: str, label: str, schedule: Schedule, result: Speed | str) -> str:
    cells = [removed, label, "" if schedule.removes_nothing else where(schedule)]
    if isinstance(result, str):
        cells += [f"failed: {result}", "", "", ""]
    else:
        merged, base = Timing(tuple(result.merged)), Timing(tuple(result.reference))
        cells += [f"{merged.median * 1e3:.1f} ({merged.spread:.0%})", f"{base.median * 1e3:.1f}",
                  speed_cell(result), f"{result.predicted:.2f}x"]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def short(schedule: Schedule) -> str:
    """A schedule in a progress line: ``illava text_guided=True 88.9% E[1, 2, 3] 40% + L[0, 1, 3]``."""
    if schedule.removes_nothing:
        return "unmerged"
    defaults = schedule.reduction_method.params_type().to_dict()
    own = [f" {key}={value}" for key, value in schedule.params.to_dict().items() if defaults.get(key) != value]
    return f"{schedule.method}{''.join(own)} {schedule.reduction:.1%} {where(schedule)}"


@dataclass
class Report:
    variants: list[Variant]
    ratios: list[float]
    accuracy: Accuracy | None
    accuracy_grid: Grid | None
    speed: SpeedRun | None
    speed_grid: Grid | None

    def retention(self, acc: float) -> str:
        return f"{acc:.1%} ({acc / self.accuracy.unmerged.mean():.1%})"

    def accuracy_cells(self, schedule: Schedule | str, ratio: float, baseline: Schedule | None = None) -> list[str]:
        """accuracy (retention), and the margin over random dropping (at the paper's placement, or
        `baseline`) with its 95% interval."""
        if isinstance(schedule, str):
            return ["—", "—"]
        hits = self.accuracy.hits(schedule)
        if isinstance(hits, str):
            return [f"failed: {hits}", "—"]
        baseline = self.accuracy.hits(baseline or Variant(BASELINE).placed(ratio, self.accuracy_grid.depths))
        if schedule.method == BASELINE:
            seeds = f"{len(hits)} seed" + ("s" if len(hits) > 1 else "")
            return [versus_random(hits[0], hits, self.retention)[0] + f" over {seeds}", "—"]
        if isinstance(baseline, str):
            return [self.retention(float(hits[0].mean())), "—"]
        return [self.retention(float(hits[0].mean())), versus_random(hits[0], baseline)[1]]

    def speed_cells(self, label: str, ratio: float, table: str) -> list[str]:
        schedule = getattr(self.speed_grid, table)[label, ratio]
        if isinstance(schedule, str):
            return ["—"]
        return [speed_cell(self.speed.results.get(schedule_key(schedule)))]

    def header(self, first: list[str]) -> list[str]:
        columns = list(first)
        if self.accuracy:
            columns += [f"accuracy on `{self.accuracy.backbone}` (retention)", "minus random, 95% CI"]
        if self.speed:
            columns += [f"prefill speedup on `{self.speed.backbone}` (min-max)"]
        return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def unmerged_row(self, width: int) -> str:
        cells = ["0%", "unmerged"] + [""] * (width - 2)
        if self.accuracy:
            cells += [self.retention(float(self.accuracy.unmerged.mean())), ""]
        if self.speed:
            cells += ["1.00x; against itself: " + speed_cell(self.speed.results[schedule_key(VANILLA)])]
        return "| " + " | ".join(cells) + " |"

    def placed_table(self) -> list[str]:
        grid = self.accuracy_grid or self.speed_grid
        backbone = (self.accuracy or self.speed).backbone
        placement = f"placement on `{backbone}` ({grid.depths[0]} encoder blocks, {grid.depths[1]} LLM layers)"
        lines = self.header(["removed", "method", placement])
        lines.append(self.unmerged_row(3))
        for ratio in self.ratios:
            for variant in self.variants:
                schedule = grid.placed[variant.label, ratio]
                if isinstance(schedule, str):
                    continue
                cells = [f"{ratio:.1%}", variant.label, where(schedule)]
                if self.accuracy:
                    cells += self.accuracy_cells(self.accuracy_grid.placed[variant.label, ratio], ratio)
                if self.speed:
                    cells += self.speed_cells(variant.label, ratio, "placed")
                lines.append("| " + " | ".join(cells) + " |")
        return lines

    def paper_table(self) -> list[str]:
        grid = self.accuracy_grid or self.speed_grid
        lines = self.header(["removed", "merge rule"])
        lines.append(self.unmerged_row(2))
        for ratio in self.ratios:
            for variant in self.variants:
                if isinstance(grid.paper[variant.label, ratio], str):
                    continue
                cells = [f"{ratio:.1%}", variant.label]
                if self.accuracy:
                    cells += self.accuracy_cells(self.accuracy_grid.paper[variant.label, ratio], ratio)
                if self.speed:
                    cells += self.speed_cells(variant.label, ratio, "paper")
                lines.append("| " + " | ".join(cells) + " |")
        return lines

    def stage_table(self, stage: str) -> list[str]:
        """`--stages`: the paper's placement with all of the removal at `stage`, only the merge rule
        swapped; "minus random" is against random dropping at that same placement."""
        grid = self.accuracy_grid or self.speed_grid
        lines = self.header(["removed", "merge rule"])
        lines.append(self.unmerged_row(2))
        for ratio in self.ratios:
            for variant in self.variants:
                if isinstance(getattr(grid, stage)[variant.label, ratio], str):
                    continue
                cells = [f"{ratio:.1%}", variant.label]
                if self.accuracy:
                    table = getattr(self.accuracy_grid, stage)
                    baseline = table[BASELINE, ratio]
                    cells += self.accuracy_cells(table[variant.label, ratio], ratio, baseline)
                if self.speed:
                    cells += self.speed_cells(variant.label, ratio, stage)
                lines.append("| " + " | ".join(cells) + " |")
        return lines

    def speed_table(self) -> list[str]:
        """Every timed schedule of the placed table with its times, the unmerged model against itself first."""
        depths = self.speed_grid.depths
        lines = [
            f"| removed | method | placement on `{self.speed.backbone}` ({depths[0]} encoder blocks, {depths[1]} "
            "LLM layers) | prefill ms, median (spread) | unmerged ms, same rounds | speedup (min-max) "
            "| predicted (FLOPs) |",
            "|---|---|---|---|---|---|---|",
            speed_row("0%", "unmerged, against itself", VANILLA, self.speed.results[schedule_key(VANILLA)]),
        ]
        for ratio in self.ratios:
            for variant in self.variants:
                schedule = self.speed_grid.placed[variant.label, ratio]
                if not isinstance(schedule, str):
                    result = self.speed.results[schedule_key(schedule)]
                    lines.append(speed_row(f"{ratio:.1%}", variant.label, schedule, result))
        return lines

    def skipped(self, table: str) -> list[str]:
        """One line per variant with no cell in `table` at any ratio, with its reason."""
        grid = self.accuracy_grid or self.speed_grid
        reasons = {}
        for variant in self.variants:
            cells = [getattr(grid, table)[variant.label, ratio] for ratio in self.ratios]
            if all(isinstance(cell, str) for cell in cells):
                reasons[variant.label] = cells[0]
        return [f"- `{label}`: {reason}" for label, reason in reasons.items()]

    def render(self) -> str:
        text = ["Each method on the stages it acts at (the paper's Tables 1 and 6):", "", *self.placed_table()]
        if skipped := self.skipped("placed"):
            text += ["", "Not placed:", *skipped]
        text += [
            "",
            "The paper's placement and budget, only the merge rule swapped (Table 5):",
            "",
            *self.paper_table(),
        ]
        if skipped := self.skipped("paper"):
            text += ["", "Not at the paper's placement (the stages they act at do not allow it):", *skipped]
        grid = self.accuracy_grid or self.speed_grid
        for stage, place in STAGE_TABLES.items():
            cells = getattr(grid, stage)
            if not cells:  # no --stages
                continue
            baseline = cells[BASELINE, self.ratios[0]]
            placement = where(baseline).removesuffix(" 100%")
            text += ["", f"The paper's placement with all of the removal {place} ({placement}), only the merge rule "
                     "swapped; minus random: against random dropping there:", "", *self.stage_table(stage)]  # fmt: skip
            if skipped := self.skipped(stage):
                text += ["", f"Not {place}:", *skipped]
        if self.speed:
            text += ["", f"Prefill on `{self.speed.backbone}` ({self.speed.seconds:.0f} s of timed rounds):", "",
                     *self.speed_table()]  # fmt: skip
        return "\n".join(text)


def provenance(args: argparse.Namespace, report: Report, started_load: float) -> str:
    """The line above the tables: command, machine, what was measured and where each figure came from."""
    command = "python benchmarks/compare.py " + " ".join(args.argv)
    parts = [f"`{command.strip()}` on {machine(args.device)}, load average {started_load:.1f} at the start"]
    if report.accuracy:
        acc = report.accuracy
        ran = [r for r in acc.results.values() if isinstance(r, Evaluation) and not r.cached]
        cached = [r for r in acc.results.values() if isinstance(r, Evaluation) and r.cached]
        commits = sorted({(r.commit or "unknown")[:7] for r in cached})
        identity = acc.identity["checkpoint"].get("sha256", "seeded")[:12]
        parts.append(
            f"accuracy: `{acc.backbone}` (checkpoint {identity}), {acc.questions} test questions, random dropping (the paper's "
            f"placement) over {acc.seeds} seed(s); {len(ran)} evaluations run now ({acc.seconds:.0f} s) at commit "
            f"{commit_note(code_version())}, {len(cached)} read from "
            f"`{display_path(args.cache)}`" + (f" (measured at {', '.join(commits)})" if cached else "")
        )
        if args.stages:
            parts.append("in the one-stage tables random dropping is at their own placement, over the same seeds")
    if report.speed:
        parts.append(
            f"speed: `{report.speed.backbone}`, one {args.size}x{args.size} image, {args.attn}, {args.rounds} rounds "
            f"after {args.warmup} warm-up, each schedule right after the unmerged model"
        )
    return "; ".join(parts) + "."


def commit_note(code: dict[str, Any]) -> str:
    """``b3358f3``, or ``b3358f3 with 4 tracked files modified``: the code a figure came from."""
    commit = (code.get("commit") or "unknown")[:7]
    modified = code.get("modified") or []
    return f"{commit} with {len(modified)} tracked files modified" if modified else commit


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------- plot
def plot(report: Report, path: Path) -> None:
    """Accuracy on the accuracy backbone against speedup on the speed backbone, a curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours, markers = plt.get_cmap("tab20").colors, "os^Dv<>PXhp*"
    for number, variant in enumerate(report.variants):
        points = []
        for ratio in report.ratios:
            acc_s, speed_s = (
                report.accuracy_grid.placed[variant.label, ratio],
                report.speed_grid.placed[variant.label, ratio],
            )
            if isinstance(acc_s, str) or isinstance(speed_s, str):
                continue
            hits, speed = report.accuracy.hits(acc_s), report.speed.results.get(schedule_key(speed_s))
            if isinstance(hits, str) or not isinstance(speed, Speed):
                continue
            points.append((speed.ratios, float(np.mean([h.mean() for h in hits]))))
        if points:
            xs = [p[0].median for p in points]
            errors = [[p[0].median - p[0].low for p in points], [p[0].high - p[0].median for p in points]]
            ax.errorbar(xs, [p[1] for p in points], xerr=errors, capsize=2, label=variant.label,
                        color=colours[number % len(colours)], marker=markers[number % len(markers)])  # fmt: skip
    ax.plot([1.0], [report.accuracy.unmerged.mean()], marker="*", markersize=12, color="black", linestyle="",
            label="unmerged")  # fmt: skip
    ax.set_xlabel(f"prefill speedup on {report.speed.backbone} (median of paired rounds, min-max)")
    ax.set_ylabel(f"accuracy on {report.accuracy.backbone} ({report.accuracy.questions} questions)")
    ax.set_title("Each method at " + ", ".join(f"{r:.1%}" for r in report.ratios) + " of image tokens removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def paper_ratio(text: str) -> float:
    """A reduction ratio; within 0.001 of one of the paper's it is that one exactly (0.889 -> 8/9)."""
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a reduction ratio is in (0, 1) (or a percentage), got {text!r}")
    return next((r for r in PAPER_REDUCTIONS if abs(r - value) < 1e-3), value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", help="rows to compare (default: every registered method and "
                        f"variant); `{BASELINE}` is always added as the baseline")  # fmt: skip
    parser.add_argument("--ratios", nargs="+", type=paper_ratio, default=list(PAPER_REDUCTIONS),
                        help="reductions, as fractions or percentages (default: the paper's 66.7 77.8 88.9%%)")  # fmt: skip
    parser.add_argument("--backbone", default="demo", help="accuracy: demo, or a checkpoint trained on its benchmark")
    parser.add_argument("--limit", type=int, default=500, help="accuracy: test questions (at most 500)")
    parser.add_argument("--seeds", type=int, default=5, help="accuracy: seeds of random dropping")
    parser.add_argument("--batch-size", type=int, default=32, help="accuracy: questions per forward")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="accuracy results, one JSON line each")
    parser.add_argument("--recheck", type=int, metavar="N",
                        help="accuracy: re-score every evaluation read from the cache on its first N questions now and "
                        "report the answers that changed (N a multiple of --batch-size keeps every batch as it was)")  # fmt: skip
    parser.add_argument("--stages", action="store_true",
                        help="also the paper's placement with all of the removal in the encoder blocks, and with all "
                        "of it after the LLM layers, only the merge rule swapped (random at the same placement)")  # fmt: skip
    parser.add_argument("--fresh", action="store_true",
                        help="recompute the accuracies of the --methods rows (all, unmerged included, without it)")  # fmt: skip
    parser.add_argument("--speed-backbone", default="small", help="speed: a built-in or checkpoint directory")
    parser.add_argument("--size", type=int, default=448, help="speed: side of the one synthetic image")
    parser.add_argument("--rounds", type=int, default=7, help="speed: timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="speed: untimed rounds first")
    parser.add_argument("--attn", default="sdpa", choices=list(illava.ATTENTIONS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (fp32)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--markdown", type=Path, help="append the tables, command and machine to this file")
    parser.add_argument("--plot", type=Path, help="accuracy against speedup as a PNG (needs both measured)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.skip_speed and args.skip_accuracy:
        parser.error("--skip-speed and --skip-accuracy together leave nothing to measure")
    if args.plot and (args.skip_speed or args.skip_accuracy):
        parser.error("--plot draws accuracy against speedup: it needs both (drop --skip-speed / --skip-accuracy)")
    if args.seeds < 1 or args.rounds < 1 or args.warmup < 0 or not 1 <= args.limit <= 500:
        parser.error("--seeds and --rounds must be >= 1, --warmup >= 0, --limit in 1..500")
    if args.recheck is not None and (args.skip_accuracy or not 1 <= args.recheck <= args.limit):
        parser.error(f"--recheck N re-scores accuracy rows: N in 1..--limit ({args.limit}), without --skip-accuracy")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    variants = select_variants(args.methods)
    accuracy = accuracy_grid = speed = speed_grid = None
    if not args.skip_accuracy:
        accuracy_grid = Grid.build(variants, args.ratios, illava.depths(backbone_config(args.backbone)),
                                   stages=args.stages)  # fmt: skip
        report_skips(accuracy_grid, variants, args.backbone, log)
        accuracy = run_accuracy(args, accuracy_grid, log)
    if not args.skip_speed:
        speed_grid = Grid.build(variants, args.ratios, illava.depths(backbone_config(args.speed_backbone)),
                                stages=args.stages)  # fmt: skip
        report_skips(speed_grid, variants, args.speed_backbone, log)
        speed = run_speed(args, speed_grid, log)
    report = Report(variants, list(args.ratios), accuracy, accuracy_grid, speed, speed_grid)
    text = provenance(args, report, load) + "\n\n" + report.render()
    if accuracy is not None and args.recheck:
        text += "\n\n" + "\n".join(recheck_report(accuracy.rechecks, args.recheck))
    print(text)
    if args.markdown:
        with args.markdown.open("a") as handle:
            handle.write("\n" + text + "\n")
    if args.plot:
        plot(report, args.plot)
        log(f"plot: {args.plot}")
    return 0


def report_skips(grid: Grid, variants: Iterable[Variant], backbone: str, log: Callable[[str], None]) -> None:
    for variant in variants:
        tables = [(grid.placed, "placed"), (grid.paper, "at the paper's placement")]
        tables += [
            (getattr(grid, stage), f"at the paper's placement {place} only") for stage, place in STAGE_TABLES.items()
        ]
        for table, what in tables:
            reasons = {cell for (label, _), cell in table.items() if label == variant.label and isinstance(cell, str)}
            for reason in sorted(reasons):
                log(f"{backbone}: {variant.label} not {what}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
