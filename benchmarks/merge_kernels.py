"""What the pieces of a merge cost on their own, beside what they replace (issue 15).

    python benchmarks/merge_kernels.py                    # CPU, float32 and bfloat16
    python benchmarks/merge_kernels.py --device cuda
    python benchmarks/merge_kernels.py --compile          # also torch.compile of the LLM merge (minutes)

1. **A merging vision block's attention.** Its importance comes out of the block's own attention,
   computed explicitly (`illava.engine.attention._explicit`: scores in float32, softmax, column
   means, then the output) where an unmerged block makes one fused SDPA call. The table times both
   on the same equal segments: 64-token windows (`small`'s merging blocks at 448) and one
   1024-token full-attention segment, in each dtype.
2. **The LLM merge's importance and selection** (`illava.merge.batched_importance` then
   `batched_merge`) on one 200-token image segment: eager, and with `--compile` under
   `torch.compile(dynamic=True)` (inductor; first call excluded), to see what fusing them buys on
   this device.

Each figure is the median of `--repeats` timed calls after warm-up, with the spread (max-min)/median.
A benchmark: it reports numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from illava.engine.attention import _explicit  # noqa: E402
from illava.merge import SegmentBatch, batched_importance, batched_merge  # noqa: E402
from profiler import time_call  # noqa: E402
from profiler.hardware import cpu_model  # noqa: E402

#: (segments, heads, tokens per segment, head dim): `small`'s vision attention (4 heads of 48).
SHAPES = [(16, 4, 64, 48), (1, 4, 1024, 48)]


def _ms(fn, repeats: int, device: torch.device) -> str:
    timing = time_call(fn, repeats=repeats, warmup=3, device=device)
    return f"{timing.median * 1e3:.2f} ({timing.spread:.0%})"


@torch.inference_mode()
def attention_rows(dtype: torch.dtype, repeats: int, device: torch.device) -> list[str]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for segments, heads, length, dim in SHAPES:
        n = segments * length
        q, k, v = (torch.randn(1, heads, n, dim, generator=generator).to(device, dtype) for _ in range(3))
        cu = torch.arange(0, n + 1, length, device=device)
        lengths = [length] * segments
        batched = [t[0].view(heads, segments, length, dim).transpose(0, 1) for t in (q, k, v)]
        call = (q, k, v, cu, lengths, length, None)
        explicit = _ms(lambda call=call: _explicit(*call), repeats, device)
        sdpa = _ms(lambda b=batched: torch.nn.functional.scaled_dot_product_attention(*b), repeats, device)
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {segments} x {length} tokens | {explicit} | {sdpa} |")
    return rows


@torch.inference_mode()
def merge_rows(repeats: int, device: torch.device, compiled: bool) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    query, key = (torch.randn(8, 200, 64, generator=generator).to(device) for _ in range(2))
    batch = SegmentBatch.of([0], [200], [150], [15], 5, device)

    def merge(importance=batched_importance, select=batched_merge):
        scores = importance(query, key, batch, causal=True, scale=None)
        return select(scores, query, key, batch, unit=1, scale=None)

    rows = [f"| eager | {_ms(merge, repeats, device)} |"]
    if compiled:
        fused = (torch.compile(batched_importance, dynamic=True), torch.compile(batched_merge, dynamic=True))
        merge(*fused)  # compiles
        rows.append(f"| torch.compile (inductor) | {_ms(lambda: merge(*fused), repeats, device)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time the LLM merge under torch.compile")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda"
             else f"CPU {cpu_model()}, {torch.get_num_threads()} threads")  # fmt: skip
    command = " ".join(["python benchmarks/merge_kernels.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"`{command}` on {where}, torch {torch.__version__}; ms: median (spread) of {args.repeats} calls\n")
    print("A merging vision block's attention, explicit (its importance with it) against one SDPA call:\n")
    print("| dtype | segments | explicit ms | SDPA ms |\n|---|---|---|---|")
    for name in args.dtypes:
        print("\n".join(attention_rows(getattr(torch, name), args.repeats, device)))
    print("\nThe LLM merge's importance and selection, one 200-token segment, 8 heads, float32:\n")
    print("| run | ms |\n|---|---|")
    print("\n".join(merge_rows(args.repeats, device, args.compile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
