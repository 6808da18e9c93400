"""Prefill latency of vanilla vs iLLaVA on a built-in backbone, beside the FLOPs prediction and what
each forward dispatches.

    python benchmarks/prefill.py                       # small, 448 and 672, sdpa and illava_packed, CPU
    python benchmarks/prefill.py --counts --backbone small tiny-qwen2-vl tiny-qwen3-vl tiny-llava-onevision \
        --attn eager sdpa illava_packed --sizes 448 896  # counts only: every family and attention, no timing
    python benchmarks/prefill.py --device cuda --dtype bfloat16 --attn sdpa illava_packed
    python benchmarks/prefill.py --device cuda --dtype bfloat16 --backbone 7b-shape --batch 8   # see below

For each backbone, attention implementation and image size, and each schedule (vanilla, then the
paper's default split at 66.7/77.8/88.9%), runs are interleaved round-robin in one process so that
drift hits every schedule alike: each repeat times the encoder alone (`get_image_features`) and the
full prefill forward (`logits_to_keep=1`). LLM time = total - encoder. A separate instrumented pass
measures the share of the merged forward spent in selection + merging + re-packing and the LLM
merges' importance; `at zero merge cost` is vanilla over the merged forward's time outside that
work: about the speedup its token counts allow on this machine. It errs low by what a merging
vision block pays to compute its attention explicitly (its importance comes out of it) instead of
with its usual kernel, which the share does not time: little where merging blocks are windows,
more where they are full attention over many tokens.

Where FLOPs overstate that, the second table says how much is the machine: it times the decoder
stack alone, unmerged, at every sequence length the schedules' decoder layers run at, and predicts
each schedule's LLM speedup from those times (mean over its layers) beside the FLOPs prediction and
the measured one. A machine whose decoder layer costs the same per token at every length gives the
FLOPs figure; one whose small matmuls are bound by reading the weights gives less
(`--no-llm-alone` skips it). Each table is printed, and appended to `--markdown`, as soon as it is
measured, so a run cut short keeps what it finished.

Beside the times, one counted forward per schedule (`profiler.counts`: a dispatch mode) gives the
aten ops, the kernel ops (those that launch work on a GPU), the host reads and the attention calls,
and their ratio to vanilla under the same attention. Vanilla is the untouched model, except under
``illava_packed``, where it is the engine removing nothing (`illava.apply_reference`): one call per
vision block on both sides. Prints markdown tables; `--markdown FILE` also appends them, with the
machine, to FILE.

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
import illava.runtime  # noqa: E402
from illava import PAPER_REDUCTIONS, Schedule  # noqa: E402
from illava.backbones import Backbone, build_config, build_image_processor, build_tokenizer, load_backbone  # noqa: E402
from illava.inputs import Sample, build_inputs, synthetic_image  # noqa: E402
from profiler import Timing, paired_ratios, time_call, time_once  # noqa: E402
from profiler.counts import ForwardCounts, count_call  # noqa: E402
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
    counts: ForwardCounts
    encoder: Timing | None = None
    total: Timing | None = None
    merge_share: float = 0.0
    predicted: float = 1.0
    flops: illava.Flops | None = None  # the schedule's, for the LLM table
    llm_curve: float = 0.0  # seconds: the unmerged LLM's own time at this schedule's per-layer lengths

    @property
    def llm(self) -> float:
        return self.total.median - self.encoder.median

    def ceiling(self, base: Result) -> float:
        """The speedup this schedule's token counts allow here at zero merge cost: vanilla over the
        merged forward's time outside merge work (medians of separate passes, so an estimate)."""
        return base.total.median / (self.total.median * (1.0 - self.merge_share))


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
        illava.apply_reference(model)  # the untouched model; under illava_packed the engine removing nothing
    else:
        illava.apply(model, schedule)


@torch.inference_mode()
def bench_size(backbone, size: int, batch_size: int, repeats: int, warmup: int, device: torch.device,
               *, timed: bool = True, decoder_alone: bool = True) -> list[Result]:  # fmt: skip
    model = backbone.model
    samples = [Sample(PROMPT, [synthetic_image(size, seed)]) for seed in range(batch_size)]
    batch = build_inputs(backbone, samples).to(device)
    adapter = backbone.adapter
    inner = adapter.inner_model(model)
    grids, text_tokens = adapter.flop_inputs(model.config, batch)
    image_tokens = sum(adapter.image_tokens(inner, batch)) // batch_size
    configs = schedules(model)

    def encoder() -> object:
        return adapter.encode_images(inner, batch)

    def total() -> object:
        return model(**batch, logits_to_keep=1)

    results = []
    for label, schedule in configs:
        set_schedule(model, schedule)
        total()  # lazy set-up is not counted
        results.append(Result(size, label, image_tokens, schedule, count_call(total),
                              predicted=illava.predicted_speedup(model.config, schedule, grids, text_tokens),
                              flops=illava.prefill_flops(model.config, schedule, grids, text_tokens)))  # fmt: skip
    if not timed:
        illava.remove(model)
        return results

    times = {label: ([], []) for label, _ in configs}
    for run in range(warmup + repeats):
        for label, schedule in configs:
            set_schedule(model, schedule)
            enc, tot = time_once(encoder, device), time_once(total, device)
            if run >= warmup:
                times[label][0].append(enc)
                times[label][1].append(tot)
        print(f"  {size}px: run {run + 1}/{warmup + repeats}", file=sys.stderr, flush=True)

    for result in results:
        result.encoder, result.total = (Timing(tuple(t)) for t in times[result.label])
        if not result.schedule.removes_nothing:
            set_schedule(model, result.schedule)
            illava.time_merges(model)
            shares = []
            for _ in range(repeats):
                seconds = time_once(total, device)
                shares.append(illava.last_stats(model).merge_seconds / seconds)
            result.merge_share = statistics.median(shares)
    illava.remove(model)
    if not decoder_alone:
        return results
    lengths = sorted({n for r in results for n in r.flops.llm_tokens})
    alone = llm_alone(backbone, lengths, batch_size, repeats, warmup, device)
    for r in results:
        r.llm_curve = statistics.fmean(alone[n].median for n in r.flops.llm_tokens)
    return results


@torch.inference_mode()
def llm_alone(backbone, lengths: list[int], batch_size: int, repeats: int, warmup: int,
              device: torch.device) -> dict[int, Timing]:  # fmt: skip
    """The decoder stack alone (no image, no merge) on random embeddings of each of `lengths`
    tokens (split over the batch), interleaved round-robin: what the unmerged LLM costs here at each
    length. A schedule whose layers run at lengths n_1..n_L then costs about the mean of these times,
    which is the speedup its token counts allow on this machine, merge work aside."""
    model = backbone.model
    decoder = model.get_decoder()
    width, dtype = model.config.get_text_config().hidden_size, next(decoder.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    embeds = {n: torch.randn(batch_size, -(-n // batch_size), width, generator=generator).to(device, dtype)
              for n in lengths}  # fmt: skip
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for run in range(warmup + repeats):
        for n in lengths:
            seconds = time_once(lambda e=embeds[n]: decoder(inputs_embeds=e, use_cache=False), device)
            if run >= warmup:
                times[n].append(seconds)
    return {n: Timing(tuple(t)) for n, t in times.items()}


@torch.inference_mode()
def text_only_floor(backbone, repeats: int, warmup: int, device: torch.device) -> Timing:
    """Prefill of the prompt's text alone: what is left when every image token is gone."""
    batch = build_inputs(backbone, [Sample(PROMPT.replace("<image> ", ""))])
    batch = batch.to(device)
    return time_call(lambda: backbone.model(**batch, logits_to_keep=1), repeats=repeats, warmup=warmup, device=device)


def _count_cells(r: Result, base: Result) -> str:
    c, b = r.counts, base.counts
    return (
        f"| {c.aten_ops} ({c.aten_ops / b.aten_ops:.2f}x) | {c.kernel_ops} ({c.kernel_ops / b.kernel_ops:.2f}x) "
        f"| {c.host_reads} ({c.host_reads - b.host_reads:+d}) | {c.attention_calls} |"
    )


COUNT_HEADER = "aten ops (x vanilla) | kernel ops (x vanilla) | host reads (+ vanilla) | attention calls |"


def table(results: list[Result]) -> str:
    timed = results[0].total is not None
    head = "| image | img tokens | schedule | "
    if timed:
        head += ("encoder ms | LLM ms | prefill ms (spread) | speedup (min-max) | predicted | measured/predicted "
                 "| merge share | at zero merge cost | ")  # fmt: skip
    head += COUNT_HEADER
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r.size: r for r in results if r.label == "vanilla"}
    for r in results:
        row = f"| {r.size}x{r.size} | {r.image_tokens} | {r.label} "
        if timed:
            speedup = paired_ratios(base[r.size].total, r.total)
            row += (
                f"| {r.encoder.median * 1e3:.1f} | {r.llm * 1e3:.1f} | {r.total.median * 1e3:.1f} ({r.total.spread:.0%}) "
                f"| {speedup.median:.2f}x ({speedup.low:.2f}-{speedup.high:.2f}) | {r.predicted:.2f}x "
                f"| {speedup.median / r.predicted:.0%} | {r.merge_share:.1%} | {r.ceiling(base[r.size]):.2f}x "
            )
        lines.append(row + _count_cells(r, base[r.size]))
    return "\n".join(lines)


def llm_table(results: list[Result]) -> str:
    """The LLM's speedup three ways: measured (ratio of medians, merge work included), what FLOPs
    predict, and what the unmerged LLM's own times at each layer's length predict (`llm_alone`)."""
    lines = ["| image | schedule | LLM tokens, first -> last layer | LLM speedup, measured (medians) | FLOPs predict "
             "| the unmerged LLM's times predict |", "|---|---|---|---|---|---|"]  # fmt: skip
    base = {r.size: r for r in results if r.label == "vanilla"}
    for r in results:
        b, tokens = base[r.size], r.flops.llm_tokens
        lines.append(
            f"| {r.size}x{r.size} | {r.label} | {tokens[0]} -> {tokens[-1]} | {b.llm / r.llm:.2f}x "
            f"| {b.flops.llm / r.flops.llm:.2f}x | {b.llm_curve / r.llm_curve:.2f}x |"
        )
    return "\n".join(lines)


def load(name: str, attn: str, dtype: torch.dtype, device: torch.device) -> Backbone:
    if name == "7b-shape":
        return seven_b_shape(attn, dtype, device)
    backbone = load_backbone(name, attn_implementation=attn, dtype=dtype)
    backbone.model.to(device)
    return backbone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", nargs="+", default=["small"],
                        help="tiny, small, tiny-qwen2-vl, ..., a checkpoint directory, or 7b-shape")  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 672])
    parser.add_argument("--batch", type=int, default=1, help="images per forward (one prompt each)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=list(illava.DTYPES))
    parser.add_argument("--attn", nargs="+", default=["sdpa", "illava_packed"], choices=list(illava.ATTENTIONS))
    parser.add_argument("--counts", action="store_true", help="counts only (deterministic, fast): no timing")
    parser.add_argument("--markdown", type=Path, help="append the tables and the machine to this file")
    parser.add_argument("--llm-alone", action=argparse.BooleanOptionalAction, default=True,
                        help="time the decoder alone at each merged length (the second table)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 5 and not args.counts:
        parser.error("--repeats must be at least 5 for a median with a spread")

    device = torch.device(args.device)
    dtype = illava.DTYPES[args.dtype]
    command = " ".join(["python benchmarks/prefill.py", *(argv if argv is not None else sys.argv[1:])])
    what = "one counted forward per schedule" if args.counts else (
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up; spread = (max-min)/median; "
        "speedup = median (min-max) of the per-round ratios; counts: one counted forward"
    )  # fmt: skip

    def emit(text: str) -> None:  # each part as soon as it is measured: a run cut short keeps those
        print(text, flush=True)
        if args.markdown:
            with args.markdown.open("a") as out:
                out.write(text + "\n")

    if args.markdown:
        with args.markdown.open("a") as out:
            out.write("\n")
    emit(f"`{command}` on {machine(device)}; {args.dtype}, batch {args.batch}; {what}\n")
    for name in args.backbone:
        for attn in args.attn:
            illava.runtime.check_attention(attn, device)
            print(f"{name}, {attn}:", file=sys.stderr, flush=True)
            backbone = load(name, attn, dtype, device)
            if device.type == "cuda":
                print(f"weights on the GPU: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB", file=sys.stderr)
            timing = dict(timed=not args.counts, decoder_alone=args.llm_alone)
            results = [
                r
                for size in args.sizes
                for r in bench_size(backbone, size, args.batch, args.repeats, args.warmup, device, **timing)
            ]
            emit(f"**{name}, {attn}**\n\n{table(results)}\n")
            if not args.counts:
                if args.llm_alone:
                    emit(f"The LLM alone:\n\n{llm_table(results)}\n")
                floor = text_only_floor(backbone, args.repeats, args.warmup, device)
                emit(f"The same prompt with no image (the floor no token reduction can go below): "
                     f"{floor.median * 1e3:.1f} ms ({floor.spread:.0%} spread).\n")  # fmt: skip
            del backbone
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
