"""Measure one schedule on one workload: latency with its spread, the encoder / merger / LLM
breakdown, decode speed, tokens, peak memory, accuracy and fidelity against the unmerged model.

Latency is paired: the timed prefills of a schedule are interleaved round-robin with the unmerged
("vanilla") reference's on the same inputs (round r: the reference, then the schedule), and
`Measurement.speedup` is the spread of the per-round ratios, so drift of the machine over a job
lands on both sides of every ratio. The reference's outputs, for accuracy, retention and fidelity,
are computed once per workload and `Profiler` and reused: a baseline from the same session,
machine and inputs. Inputs are built before any timed region.

A ``downsample`` schedule (`illava.methods.downsample`) is the unmerged model on inputs resized
before the processor: its runs -- prefills, generations, memory, accuracy (every way of scoring)
-- get the workload's samples built with the schedule (`illava.inputs.build_inputs(...,
schedule=...)`), while the paired reference of every round, and the outputs fidelity is measured
against, stay at full resolution. Its model is the reference's (`illava.apply_reference`), so the
pair differs in the inputs only.

Memory: on CUDA the allocator's peak over the schedule's runs (a prefill as timed, then the
generations, timed and for the outputs; the paired prefills run before, so the reference's runs do
not count in it); on CPU the peak of live tensor bytes (weights, buffers and inputs included) of
one untimed generate on the first batch, read from torch's profiler (`profiler.memory.tensor_peak`):
deterministic, where the process's resident set is not. ``peak_memory["objective_bytes"]`` is the
figure to minimise, ``peak_memory["objective_source"]`` says which figure it is.

Accuracy on a labelled multiple-choice dataset is scored by comparing the logits of the option
letters at the answer position (the first generated token): one forward per sample, no parsing,
deterministic. `score="generate"` instead generates `output_tokens` greedily and parses the
letter with `profiler.datasets.parse_choice`. `score="options"` asks for the option's text and picks
the option whose text is most likely after the prompt (one sequence per option; see
`profiler.accuracy`): models that answer in words, such as `demo`, whose config says
``mcq_answer = "text"``, are scored this way by default.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import StoppingCriteria, StoppingCriteriaList

import illava
from illava import Schedule
from illava.backbones import Backbone, load_backbone
from illava.inputs import Sample, build_inputs
from illava.methods.downsample import downsamples
from illava.runtime import check_attention, torch_dtype

from .accuracy import answer_style, choose_by_text, letter_ids
from .datasets import parse_choice, read_dataset
from .hardware import HardwareProfile, detect_hardware, resolve_device
from .items import MCQItem
from .memory import MemoryReading, MemorySampler, tensor_peak
from .timing import Timing, paired_ratios, time_once
from .workload import Workload, batches, synthetic_samples


# ----------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Spread:
    """Seconds (or a rate, or a ratio) over repeated runs: median, p90 and the whole range."""

    median: float
    p90: float
    low: float
    high: float
    cv: float  # coefficient of variation: stdev / mean
    runs: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        ordered = sorted(samples)
        mean = sum(ordered) / len(ordered)
        var = sum((x - mean) ** 2 for x in ordered) / max(len(ordered) - 1, 1)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        return cls(
            Timing(tuple(ordered)).median,
            p90,
            ordered[0],
            ordered[-1],
            math.sqrt(var) / mean if mean else 0.0,
            len(ordered),
        )


@dataclass(frozen=True)
class Fidelity:
    """Agreement with the unmerged model on the same inputs; needs no labels."""

    first_token_agreement: float  # share of samples whose next-token argmax matches
    mean_kl: float  # mean KL(vanilla || merged) of the next-token distribution at the answer position
    greedy_match_rate: float  # share of samples whose greedy continuation is identical


@dataclass(frozen=True)
class Measurement:
    backbone: str
    schedule: dict[str, Any]
    workload: dict[str, Any]
    hardware: dict[str, Any]
    versions: dict[str, str]
    prefill_s: Spread  # time to first token at the workload's batch size (this schedule's runs of the paired rounds)
    encoder_s: Spread  # vision blocks (patch embedding to patch merger)
    merger_s: Spread  # the patch merger (projector)
    llm_s: Spread  # everything else of the prefill: embedding, LLM layers, lm_head
    decode_tokens_per_s: float | None  # generated tokens per second after the first, whole batch (None: 1 token)
    samples_per_s: float  # end to end: prefill + `output_tokens` decoded, at the workload's batch size
    image_tokens_to_llm: float  # mean per sample
    tokens_per_llm_layer: float  # mean sequence length over the LLM's layers, per sample
    peak_memory: dict[str, Any]
    accuracy: float | None
    retention: float | None  # accuracy / vanilla accuracy, same session
    fidelity: Fidelity
    n_samples: int
    # How `accuracy` was read (see SCORES): accuracies read differently do not compare. None without labels
    # (and in measurements stored before this field existed).
    accuracy_score: str | None = None
    # Paired latency (see the module doc): per-round ratios reference seconds / schedule seconds, and the
    # reference's prefill seconds of those same rounds (as many runs as `prefill_s`). None for the reference
    # itself, and in measurements stored before these fields existed.
    speedup: Spread | None = None
    reference_prefill_s: Spread | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        data = dict(data)
        for name in ("prefill_s", "encoder_s", "merger_s", "llm_s"):
            data[name] = Spread(**data[name])
        for name in ("speedup", "reference_prefill_s"):
            if data.get(name) is not None:
                data[name] = Spread(**data[name])
        data["fidelity"] = Fidelity(**data["fidelity"])
        return cls(**data)


# ----------------------------------------------------------------------------------- clocks
class _StageClock:
    """Timestamps the encoder and its projector inside one forward, through module hooks, so
    the breakdown comes from the same runs as the total. Works merged or not: both paths call the
    adapter's first encoder module first and its projector last (`vision_timing_modules`).

    On CUDA a mark is a CUDA event recorded on the current stream (no synchronisation inside the
    forward, so the timed run keeps its asynchrony); the events are read in `take`, which is
    called after the timed run synchronised. On CPU a mark is `time.perf_counter()`.
    """

    def __init__(self, modules: tuple[torch.nn.Module, torch.nn.Module], device: torch.device):
        first, projector = modules
        self.device = device
        self.marks: list[tuple[str, Any]] = []
        self.handles = [
            first.register_forward_pre_hook(lambda *_: self._mark("encoder")),
            projector.register_forward_pre_hook(lambda *_: self._mark("merger")),
            projector.register_forward_hook(lambda *_: self._mark("end")),
        ]

    def _mark(self, what: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append((what, event))
        else:
            self.marks.append((what, time.perf_counter()))

    def _seconds(self, start: Any, stop: Any) -> float:
        if self.device.type == "cuda":
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3  # milliseconds
        return stop - start

    def take(self) -> tuple[float, float]:
        """(encoder seconds, merger seconds) since the last take, summed over image and video passes."""
        encoder = merger = 0.0
        start = merge_start = None
        for what, at in self.marks:
            if what == "encoder":
                start = at
            elif what == "merger":
                encoder += self._seconds(start, at)
                merge_start = at
            else:
                merger += self._seconds(merge_start, at)
        self.marks.clear()
        return encoder, merger

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _StepClock(StoppingCriteria):
    """Called by `generate` once per generated token: timestamps of every step, never stops it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# ----------------------------------------------------------------------------------- references
@dataclass
class _Prefills:
    """Timed prefill rounds: the measured model's seconds with its encoder and merger parts, and the
    unmerged reference's seconds of the same rounds (empty when the reference is the one measured)."""

    totals: list[float] = dataclasses.field(default_factory=list)
    encoders: list[float] = dataclasses.field(default_factory=list)
    mergers: list[float] = dataclasses.field(default_factory=list)
    references: list[float] = dataclasses.field(default_factory=list)


@dataclass
class _Outputs:
    """What a schedule produced on every sample of a workload."""

    next_token_logits: torch.Tensor  # (S, V) float32 at the answer position
    greedy: list[torch.Tensor]  # per sample: generated ids
    predictions: list[str | None]  # per sample: chosen option letter (labelled workloads)
    correct: list[bool]


def _versions() -> dict[str, str]:
    try:
        own = importlib.metadata.version("illava-tune")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return {"illava-tune": own, "torch": torch.__version__, "transformers": transformers.__version__}


SCORES = ("logits", "generate", "options")


class Profiler:
    """Loads a backbone once and measures schedules on workloads.

    >>> profiler = Profiler("tiny")
    >>> result = profiler.measure(Schedule.paper_default(0.778, encoder_depth=6, llm_depth=6), workload)
    """

    def __init__(
        self,
        backbone: Backbone | str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        attn_implementation: str = "sdpa",
        repeats: int = 5,
        warmup: int = 2,
        score: str | None = None,
        progress: Callable[[Iterable], Iterable] | None = None,
    ):
        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
        if score not in (None, *SCORES):
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        self.device = resolve_device(device)
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        else:
            check_attention(attn_implementation, self.device)
            self.backbone = load_backbone(backbone, attn_implementation=attn_implementation, dtype=torch_dtype(dtype))
        self.backbone.model.to(self.device).eval()
        answers = answer_style(self.backbone.model)
        # Default: the model's own way of answering (letters: their logits; option text: its likelihood).
        self.score = score or ("options" if answers == "text" else "logits")
        self.answer = "text" if self.score == "options" else answers  # the instruction the prompt gives
        self.repeats, self.warmup = repeats, warmup
        self.progress = progress or (lambda items: items)
        # What the model really runs in (a Backbone handed in says it itself), recorded with every measurement.
        self.dtype, self.attention = illava.model_runtime(self.model)
        self.hardware: HardwareProfile = detect_hardware(self.device, dtype=self.dtype, attention=self.attention)
        self._references: dict[str, tuple[Measurement, _Outputs]] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    # ------------------------------------------------------------------ inputs
    def _items(self, workload: Workload) -> tuple[list[Sample], list[MCQItem] | None]:
        workload.check_fits(self.backbone.adapter.size_multiple(self.model.config), self.backbone.name)
        if workload.dataset is None:
            return synthetic_samples(workload), None
        items = read_dataset(workload.dataset, limit=workload.samples)
        return [item.to_sample(self.answer) for item in items], items

    def _batches(self, samples: list[Sample], batch_size: int, schedule: Schedule | None = None) -> list[Any]:
        """The workload's batches on the device; as `schedule` wants them built (a downsample one resizes)."""
        return [
            build_inputs(self.backbone, chunk, schedule=schedule).to(self.device)
            for chunk in batches(samples, batch_size)
        ]

    # ------------------------------------------------------------------ public
    def measure(self, schedule: Schedule | dict | str, workload: Workload) -> Measurement:
        """Measure `schedule` on `workload`, its prefills timed in rounds with the unmerged
        reference's (whose outputs are computed first, once per workload)."""
        schedule = Schedule.coerce(schedule)
        key = json.dumps(workload.to_dict(), sort_keys=True)
        samples, items = self._items(workload)
        inputs = self._batches(samples, workload.batch_size)
        if key not in self._references:
            self._references[key] = self._run(None, workload, inputs, items, reference=None)
        own = self._batches(samples, workload.batch_size, schedule) if downsamples(schedule) else inputs
        return self._run(schedule, workload, own, items, reference=self._references[key], paired=inputs[0])[0]

    def reference(self, workload: Workload) -> Measurement:
        """The unmerged model's measurement of `workload` (measured on first use)."""
        key = json.dumps(workload.to_dict(), sort_keys=True)
        if key not in self._references:
            samples, items = self._items(workload)
            inputs = self._batches(samples, workload.batch_size)
            self._references[key] = self._run(None, workload, inputs, items, reference=None)
        return self._references[key][0]

    @torch.inference_mode()
    def _run(
        self, schedule: Schedule | None, workload, inputs, items, reference, *, paired=None
    ) -> tuple[Measurement, _Outputs]:
        """One measurement; `schedule=None` is the reference: the untouched model -- except under
        ``illava_packed`` attention, whose fair reference is the engine removing nothing
        (`illava.apply_reference`). A schedule that removes nothing is that same model (a job's
        "unmerged" trial is what a deployment runs without illava, timed against itself: its
        speedup is 1 within the pairing's noise); the engine's own overhead is what
        `benchmarks/prefill.py` counts. `inputs` are the schedule's batches; `paired` is the batch
        the reference's paired prefills run on (the first of `inputs` when not given; the
        full-resolution one for a downsample schedule)."""
        self._use(schedule)
        try:
            prefills = self._time_prefill(inputs[0], schedule, inputs[0] if paired is None else paired)
            # Sampled after the paired prefills, so the reference's runs stay out of this schedule's peak;
            # one more (untimed) prefill as timed keeps that forward in it.
            with MemorySampler(self.device) as sampler:
                self.model(**inputs[0], logits_to_keep=1)
                image_tokens, layer_tokens = self._token_counts(inputs[0])
                steps, e2e = self._time_generate(inputs[0], workload.output_tokens)
                outputs = self._outputs(inputs, items, workload.output_tokens, schedule)
            memory = self._with_tensor_peak(sampler.reading, inputs[0], workload.output_tokens)
        finally:
            illava.remove(self.model)
        schedule = schedule or Schedule.vanilla()
        batch = inputs[0]["input_ids"].shape[0]
        decode_s = steps[-1] - steps[0] if len(steps) > 1 else 0.0
        accuracy = sum(outputs.correct) / len(outputs.correct) if items else None
        if reference is None:
            retention, fidelity = (1.0 if accuracy is not None else None), Fidelity(1.0, 0.0, 1.0)
        else:
            base = reference[0].accuracy
            retention = accuracy / base if accuracy is not None and base else None
            fidelity = _fidelity(reference[1], outputs)
        measurement = Measurement(
            backbone=self.backbone.name,
            schedule=schedule.to_dict(),
            workload=workload.to_dict(),
            hardware=self.hardware.to_dict(),
            versions=_versions(),
            prefill_s=Spread.of(prefills.totals),
            encoder_s=Spread.of(prefills.encoders),
            merger_s=Spread.of(prefills.mergers),
            llm_s=Spread.of([p - e - m for p, e, m in zip(prefills.totals, prefills.encoders, prefills.mergers)]),
            decode_tokens_per_s=batch * (len(steps) - 1) / decode_s if decode_s > 0 else None,
            samples_per_s=batch / e2e,
            image_tokens_to_llm=image_tokens,
            tokens_per_llm_layer=layer_tokens,
            peak_memory=memory.to_dict(),
            accuracy=accuracy,
            retention=retention,
            fidelity=fidelity,
            n_samples=len(outputs.correct),
            accuracy_score=self.score if items else None,
            speedup=_paired_speedup(prefills),
            reference_prefill_s=Spread.of(prefills.references) if prefills.references else None,
        )
        return measurement, outputs

    def _use(self, schedule: Schedule | None) -> None:
        """Switch the model to `schedule`, or (None, nothing to remove, or a downsample schedule,
        whose model is unmerged) to the unmerged reference `_run` describes."""
        if schedule is not None and not schedule.removes_nothing and not downsamples(schedule):
            illava.apply(self.model, schedule)  # removes what was applied first
        else:
            illava.apply_reference(self.model)

    def _time_prefill(self, batch, schedule: Schedule | None, paired) -> _Prefills:
        """`self.warmup` untimed rounds, then `self.repeats` timed ones, of the prefill of `batch`.
        With a schedule, every round runs the unmerged reference first, on `paired` (`batch` but for a
        downsample schedule), then the schedule on `batch`; the stage marks of the reference's runs
        are dropped. Leaves `schedule` applied."""
        adapter = self.backbone.adapter
        clock = _StageClock(adapter.vision_timing_modules(adapter.inner_model(self.model)), self.device)
        prefills = _Prefills()

        def prefill(inputs=batch) -> object:
            return self.model(**inputs, logits_to_keep=1)

        try:
            for run in range(self.warmup + self.repeats):
                if schedule is not None:
                    self._use(None)
                    reference = time_once(lambda: prefill(paired), self.device)
                    clock.take()  # the reference's marks: not this schedule's breakdown
                    self._use(schedule)
                total = time_once(prefill, self.device)
                encoder, merger = clock.take()
                if run >= self.warmup:
                    prefills.totals.append(total)
                    prefills.encoders.append(encoder)
                    prefills.mergers.append(merger)
                    if schedule is not None:
                        prefills.references.append(reference)
        finally:
            clock.close()
        return prefills

    def _time_generate(self, batch, output_tokens: int) -> tuple[list[float], float]:
        """Step timestamps of one greedy generation of exactly `output_tokens`, and its wall time."""
        clock = _StepClock(self.device)
        kwargs = dict(max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False)
        self.model.generate(**batch, **kwargs)  # warm-up
        clock.stamps.clear()
        seconds = time_once(
            lambda: self.model.generate(**batch, **kwargs, stopping_criteria=StoppingCriteriaList([clock])), self.device
        )
        return clock.stamps, seconds

    def _with_tensor_peak(self, reading: MemoryReading, batch, output_tokens: int) -> MemoryReading:
        """On CPU, `reading` with the tensor peak of one untimed greedy generation of `output_tokens`
        on `batch` (what a deployment runs), weights, buffers and inputs included; a failure of the
        tracking goes to the note. On CUDA, `reading` as it is (the allocator's peak is the figure)."""
        if self.device.type != "cpu":
            return reading
        kwargs = dict(max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False)
        resident = [*self.model.parameters(), *self.model.buffers(), *(v for v in batch.values() if torch.is_tensor(v))]
        try:
            peak = tensor_peak(lambda: self.model.generate(**batch, **kwargs), resident)
        except RuntimeError as err:
            note = f"cpu tensor peak unavailable: {err}"
            return dataclasses.replace(reading, note="; ".join(n for n in (reading.note, note) if n))
        return reading.with_tensor_peak(peak)

    def _outputs(self, inputs, items: list[MCQItem] | None, output_tokens: int, schedule: Schedule | None) -> _Outputs:
        """Every sample's answer-position logits, greedy continuation and (labelled) choice; `schedule`
        builds the option sequences of ``score="options"`` (a downsample one resizes them too)."""
        logits, greedy, predictions, correct = [], [], [], []
        letters = letter_ids(self.backbone.tokenizer) if items and self.score == "logits" else {}
        for batch in self.progress(inputs):
            # One generate gives both: the first step's logits are the answer position's (no second prefill).
            out = self.model.generate(**batch, max_new_tokens=output_tokens, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)  # fmt: skip
            last = out.logits[0].float()  # (B, V)
            new = out.sequences[:, batch["input_ids"].shape[1] :]
            logits.append(last.cpu())
            greedy.extend(row.cpu() for row in new)
            if items is not None and self.score == "options":
                chunk = items[len(predictions) : len(predictions) + last.shape[0]]
                choices = choose_by_text(self.backbone, chunk, self.device, schedule=schedule)
                for item, choice in zip(chunk, choices, strict=True):
                    predictions.append(choice)
                    correct.append(choice == item.answer)
                continue
            for row in range(last.shape[0]):
                if items is None:
                    continue
                item = items[len(predictions)]
                if self.score == "logits":
                    options = list(item.options)
                    choice = options[int(torch.argmax(last[row, [letters[o] for o in options]]))]
                else:
                    text = self.backbone.tokenizer.decode(new[row], skip_special_tokens=True)
                    choice = parse_choice(text, item.options)
                predictions.append(choice)
                correct.append(choice == item.answer)
        if items is None:
            correct = [False] * sum(len(t) for t in logits)
        return _Outputs(torch.cat(logits), greedy, predictions, correct)

    def _token_counts(self, batch) -> tuple[float, float]:
        """(image tokens entering the LLM, mean tokens per LLM layer) per sample, for `batch`: from
        the stats of the last prefill when patched, from the inputs when not."""
        if not illava.is_applied(self.model):
            adapter = self.backbone.adapter
            image = adapter.image_tokens(adapter.inner_model(self.model), batch)
            return sum(image) / len(image), float(batch["attention_mask"].sum(dim=1).float().mean())
        stats = illava.last_stats(self.model)
        image = float(stats.llm_image_tokens[0].float().mean())
        layers = float(torch.stack(stats.llm_sequence).float().mean())
        return image, layers


def _paired_speedup(prefills: _Prefills) -> Spread | None:
    if not prefills.references:
        return None
    return Spread.of(paired_ratios(Timing(tuple(prefills.references)), Timing(tuple(prefills.totals))).samples)


def _fidelity(reference: _Outputs, outputs: _Outputs) -> Fidelity:
    ref_logp = reference.next_token_logits.log_softmax(dim=-1)
    logp = outputs.next_token_logits.log_softmax(dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)  # (S,)
    agree = (ref_logp.argmax(dim=-1) == logp.argmax(dim=-1)).float()
    match = [torch.equal(a, b) for a, b in zip(reference.greedy, outputs.greedy)]
    return Fidelity(float(agree.mean()), float(kl.clamp_min(0).mean()), sum(match) / len(match))


__all__ = ["Fidelity", "Measurement", "Profiler", "Spread"]
