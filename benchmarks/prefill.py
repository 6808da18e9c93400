"""Prefill latency of vanilla vs iLLaVA on a built-in backbone, beside the FLOPs prediction.

    python benchmarks/prefill.py                       # small, 448 and 672, 7 runs, CPU
    python benchmarks/prefill.py --device cuda --dtype bfloat16 --attn sdpa
    python benchmarks/prefill.py --device cuda --dtype bfloat16 --backbone 7b-shape   # see below

For each image size and schedule (vanilla, then the paper's default split at 66.7/77.8/88.9%),
runs are interleaved round-robin in one process so that drift hits every schedule alike:
each repeat times the encoder alone (`get_image_features`) and the full prefill forward
(`logits_to_keep=1`). LLM time = total - encoder. A separate instrumented pass measures the
share of the merged forward spent in importance + selection + merging + re-packing.
Prints a markdown table; `--markdown FILE` also appends it, with the machine, to FILE.

`--backbone 7b-shape` is Qwen2.5-VL-7B's architecture (32-block 1280-wide encoder, 28-layer
3584-wide LLM with 4 KV heads) with random weights, built directly on `--device` (about 15 GB in
bf16; no checkpoint is read) and the built-in tokenizer's small vocabulary: its timings are those
of the real model's shapes, its outputs are noise. Images above the processor's 1280-token limit
are scaled down by it; the table's `img tokens` column is what the LLM actually received.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import illava  # noqa: E402
from illava import PAPER_REDUCTIONS, Schedule  # noqa: E402
from illava.backbones import Backbone, build_config, build_image_processor, build_tokenizer, load_backbone  # noqa: E402
from illava.inputs import Sample, build_inputs, synthetic_image  # noqa: E402
from profiler import Timing, time_call, time_once  # noqa: E402
from profiler.hardware import cpu_model  # noqa: E402

PROMPT = "<image> What shapes are in this picture, and what colour is each one?"


# Qwen2.5-VL-7B-Instruct's config.json, the fields that set the cost of a forward.
SEVEN_B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
SEVEN_B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, max_position_embeddings=32768)  # fmt: skip


def seven_b_shape(attn: str, dtype: torch.dtype, device: torch.device) -> Backbone:
    """Qwen2.5-VL-7B's architecture with random weights, initialised on `device` (see the module doc)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    data = build_config("small").to_dict()
    data["vision_config"].update(SEVEN_B_VISION)
    text = data["text_config"]
    text.update(SEVEN_B_TEXT)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [16, 24, 24]}  # head_dim 128, as the 7B
    data["text_config"] = {k: v for k, v in text.items() if k != "layer_types"}  # re-derived for 28 layers
    config = Qwen2_5_VLConfig.from_dict(data)
    rng_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
    return Backbone(model=model.eval(), tokenizer=build_tokenizer(), image_processor=build_image_processor(),
                    name="7b-shape", adapter=illava.adapter_for(model))  # fmt: skip


@dataclass
class Result:
    size: int
    label: str
    image_tokens: int
    schedule: Schedule
    encoder: Timing
    total: Timing
    merge_share: float
    predicted: float

    @property
    def llm(self) -> float:
        return self.total.median - self.encoder.median


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def schedules(model) -> list[tuple[str, Schedule]]:
    return [("vanilla", Schedule.vanilla())] + [
        (f"iLLaVA {r:.1%}", illava.paper_default_for(model, r)) for r in PAPER_REDUCTIONS
    ]


def set_schedule(model, schedule: Schedule) -> None:
    if schedule.removes_nothing:
        illava.remove(model)  # vanilla is the unpatched model itself
    else:
        illava.apply(model, schedule)


@torch.inference_mode()
def bench_size(backbone, size: int, repeats: int, warmup: int, device: torch.device) -> list[Result]:
    model = backbone.model
    batch = build_inputs(backbone, [Sample(PROMPT, [synthetic_image(size, 0)])])
    batch = batch.to(device)
    adapter = backbone.adapter
    inner = adapter.inner_model(model)
    grids, text_tokens = adapter.flop_inputs(model.config, batch)
    image_tokens = sum(adapter.image_tokens(inner, batch))
    configs = schedules(model)

    def encoder() -> object:
        return adapter.encode_images(inner, batch)

    def total() -> object:
        return model(**batch, logits_to_keep=1)

    samples = {label: ([], []) for label, _ in configs}
    for run in range(warmup + repeats):
        for label, schedule in configs:
            set_schedule(model, schedule)
            enc, tot = time_once(encoder, device), time_once(total, device)
            if run >= warmup:
                samples[label][0].append(enc)
                samples[label][1].append(tot)
        print(f"  {size}px: run {run + 1}/{warmup + repeats}", file=sys.stderr, flush=True)

    results = []
    for label, schedule in configs:
        share = 0.0
        if not schedule.removes_nothing:
            set_schedule(model, schedule)
            illava.time_merges(model)
            shares = []
            for _ in range(repeats):
                seconds = time_once(total, device)
                shares.append(illava.last_stats(model).merge_seconds / seconds)
            share = statistics.median(shares)
        encoder_t, total_t = (Timing(tuple(s)) for s in samples[label])
        results.append(
            Result(
                size,
                label,
                image_tokens,
                schedule,
                encoder_t,
                total_t,
                share,
                illava.predicted_speedup(model.config, schedule, grids, text_tokens),
            )
        )
    illava.remove(model)
    return results


@torch.inference_mode()
def text_only_floor(backbone, repeats: int, warmup: int, device: torch.device) -> Timing:
    """Prefill of the prompt's text alone: what is left when every image token is gone."""
    batch = build_inputs(backbone, [Sample(PROMPT.replace("<image> ", ""))])
    batch = batch.to(device)
    return time_call(lambda: backbone.model(**batch, logits_to_keep=1), repeats=repeats, warmup=warmup, device=device)


def paired_speedups(vanilla: Timing, merged: Timing) -> Timing:
    """Speedup of each round (runs are interleaved, so round r of both saw the same machine state)."""
    return Timing(tuple(v / m for v, m in zip(vanilla.samples, merged.samples)))


def table(results: list[Result]) -> str:
    lines = [
        "| image | img tokens | schedule | encoder ms | LLM ms | prefill ms (spread) | speedup (min-max) | predicted "
        "| measured/predicted | merge share |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r.size: r.total for r in results if r.label == "vanilla"}
    for r in results:
        speedup = paired_speedups(base[r.size], r.total)
        lines.append(
            f"| {r.size}x{r.size} | {r.image_tokens} | {r.label} | {r.encoder.median * 1e3:.1f} | {r.llm * 1e3:.1f} "
            f"| {r.total.median * 1e3:.1f} ({r.total.spread:.0%}) "
            f"| {speedup.median:.2f}x ({speedup.low:.2f}-{speedup.high:.2f}) | {r.predicted:.2f}x "
            f"| {speedup.median / r.predicted:.0%} | {r.merge_share:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small", help="tiny, small, a checkpoint directory, or 7b-shape")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 672])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    parser.add_argument("--markdown", type=Path, help="append the table and the machine to this file")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 for a median with a spread")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.backbone == "7b-shape":
        backbone = seven_b_shape(args.attn, dtype, device)
    else:
        backbone = load_backbone(args.backbone, attn_implementation=args.attn, dtype=dtype)
        backbone.model.to(device)
    if device.type == "cuda":
        print(f"weights on the GPU: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB", file=sys.stderr)
    results = [r for size in args.sizes for r in bench_size(backbone, size, args.repeats, args.warmup, device)]
    floor = text_only_floor(backbone, args.repeats, args.warmup, device)
    header = (
        f"`{' '.join(['python benchmarks/prefill.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"on {machine(device)}; backbone {args.backbone}, {args.dtype}, {args.attn}, "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up; spread = (max-min)/median; speedup = median (min-max) of the per-round ratios"
    )
    report = (
        f"{header}\n\n{table(results)}\n\nThe same prompt with no image (the floor no token reduction can go "
        f"below): {floor.median * 1e3:.1f} ms ({floor.spread:.0%} spread).\n"
    )
    print(report)
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
