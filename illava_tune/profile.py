"""`illava-tune profile` and `illava-tune hardware`: thin over `profiler`."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import illava
from illava import Schedule
from profiler import Measurement, Profiler, detect_hardware, resolve_workload
from profiler.workload import default_workload


def build_schedule(profiler: Profiler, *, method: str, reduction: float, encoder_share: float | None,
                   schedule_file: str | None) -> Schedule:  # fmt: skip
    """A schedule file wins; otherwise the paper's default layers for this backbone's depths, placed
    on the stages `method` acts at (FastV: its first LLM layer only; DivPrune: all before the LLM)."""
    if schedule_file:
        return Schedule.coerce(Path(schedule_file))
    from illava.methods import get_method

    placed = get_method(method).placement(illava.paper_default_for(profiler.model, reduction))
    return placed if encoder_share is None else placed.with_(encoder_share=encoder_share)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def format_report(reference: Measurement, result: Measurement) -> str:
    """Side by side: the unmerged reference and the schedule, with the ratio where it means something."""
    # The reference's times from the rounds interleaved with the schedule's, and their per-round ratios.
    paired = result.reference_prefill_s or reference.prefill_s
    speedup = result.speedup
    ratio = (f"speedup {speedup.median:.2f}x ({speedup.low:.2f}-{speedup.high:.2f}, paired)" if speedup is not None
             else f"speedup {paired.median / result.prefill_s.median:.2f}x")  # fmt: skip
    rows = [
        ("prefill ms (median)", _ms(paired.median), _ms(result.prefill_s.median), ratio),
        ("prefill ms (p90)", _ms(reference.prefill_s.p90), _ms(result.prefill_s.p90), ""),
        ("prefill spread (cv)", f"{reference.prefill_s.cv:.1%}", f"{result.prefill_s.cv:.1%}", ""),
        ("  encoder ms", _ms(reference.encoder_s.median), _ms(result.encoder_s.median), ""),
        ("  merger ms", _ms(reference.merger_s.median), _ms(result.merger_s.median), ""),
        ("  LLM ms", _ms(reference.llm_s.median), _ms(result.llm_s.median), ""),
        ("decode tokens/s", _rate(reference.decode_tokens_per_s), _rate(result.decode_tokens_per_s), ""),
        ("samples/s (end to end)", f"{reference.samples_per_s:.2f}", f"{result.samples_per_s:.2f}", ""),
        ("image tokens -> LLM", f"{reference.image_tokens_to_llm:.0f}", f"{result.image_tokens_to_llm:.0f}", ""),
        ("tokens per LLM layer", f"{reference.tokens_per_llm_layer:.1f}", f"{result.tokens_per_llm_layer:.1f}", ""),
        ("peak memory MiB", _mib(reference), _mib(result), result.peak_memory.get("objective_source") or ""),
        ("accuracy", _pct(reference.accuracy), _pct(result.accuracy),
         f"retention {result.retention:.1%}" if result.retention is not None else ""),
        ("first-token agreement", "", f"{result.fidelity.first_token_agreement:.1%}", ""),
        ("mean KL at answer", "", f"{result.fidelity.mean_kl:.4f}", ""),
        ("greedy match rate", "", f"{result.fidelity.greedy_match_rate:.1%}", ""),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'vanilla':>12}  {'schedule':>12}", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {a:>12}  {b:>12}  {note}".rstrip() for name, a, b, note in rows]
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _mib(m: Measurement) -> str:
    """The memory figure a search minimises (`peak_memory["objective_bytes"]`, deterministic), in MiB."""
    peak = m.peak_memory.get("objective_bytes")
    return "-" if peak is None else f"{peak / 2**20:.1f}"


def run_profile(args) -> int:
    from tqdm.auto import tqdm

    workload = resolve_workload(args.workload or default_workload(args.backbone))
    if args.dataset:
        workload = dataclasses.replace(workload, dataset=str(args.dataset), samples=args.limit or workload.samples)
    elif args.limit:
        workload = dataclasses.replace(workload, samples=args.limit)
    progress = (lambda items: tqdm(items, desc="samples", unit="batch", file=sys.stderr)) if not args.quiet else None
    print(f"loading backbone {args.backbone!r} ...", file=sys.stderr, flush=True)
    profiler = Profiler(args.backbone, device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                        repeats=args.repeats, warmup=args.warmup, score=args.score, progress=progress)  # fmt: skip
    schedule = build_schedule(profiler, method=args.method, reduction=args.reduction,
                              encoder_share=args.encoder_share, schedule_file=args.schedule)  # fmt: skip
    print("measuring the unmerged reference ...", file=sys.stderr, flush=True)
    reference = profiler.reference(workload)
    print("measuring the schedule ...", file=sys.stderr, flush=True)
    result = profiler.measure(schedule, workload)
    print(f"backbone {args.backbone} on {profiler.hardware.key()}, workload {workload.name}, "
          f"{result.n_samples} samples, batch {workload.batch_size}")  # fmt: skip
    print(f"schedule {schedule.to_json()}")
    print(format_report(reference, result))
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": reference.to_dict(), "result": result.to_dict()}, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_hardware(args) -> int:
    profile = detect_hardware(args.device, dtype=args.dtype, attention=args.attn)
    for key, value in profile.to_dict().items():
        print(f"{key:<12} {value}")
    print(f"{'key':<12} {profile.key()}  (what `illava-tune best --hardware` takes)")
    return 0
