"""`illava-tune demo`: one image prompt on a built-in backbone, unmerged and merged at the paper's
three reduction ratios, with measured prefill time beside the speedup the FLOPs predict."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import illava
from illava import PAPER_REDUCTIONS, Schedule
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image
from illava.runtime import check_attention, torch_dtype
from profiler import Timing, time_call

PROMPT = "<image> What shapes are in this picture, and what colour is each one?"


@dataclass(frozen=True)
class DemoRow:
    label: str
    schedule: Schedule
    llm_image_tokens: int  # image tokens entering the LLM (after the encoder's merges)
    final_image_tokens: int  # image tokens after the last LLM merge
    prefill: Timing
    predicted: float  # FLOPs speedup over vanilla


@torch.inference_mode()
def run_demo(
    backbone_name: str = "small",
    *,
    image_size: int = 448,
    repeats: int = 3,
    warmup: int = 1,
    dtype: str = "float32",
    attention: str = "sdpa",
    progress=print,
) -> list[DemoRow]:
    progress(f"building backbone {backbone_name!r} ...")
    backbone = load_backbone(backbone_name, attn_implementation=check_attention(attention, "cpu"),
                             dtype=torch_dtype(dtype))  # fmt: skip
    model = backbone.model
    batch = build_inputs(backbone, [Sample(PROMPT, [synthetic_image(image_size, 0)])])
    adapter = backbone.adapter
    grids, text_tokens = adapter.flop_inputs(model.config, batch)
    image_tokens = sum(adapter.image_tokens(adapter.inner_model(model), batch))
    rows = []
    for reduction in (0.0, *PAPER_REDUCTIONS):
        schedule = illava.paper_default_for(model, reduction)
        label = "vanilla" if reduction == 0 else f"iLLaVA {reduction:.1%}"
        progress(f"timing {label} ({warmup} warm-up + {repeats} runs) ...")
        if reduction:
            illava.apply(model, schedule)
        else:
            illava.apply_reference(model)
        timing = time_call(lambda: model(**batch, logits_to_keep=1), repeats=repeats, warmup=warmup)
        if reduction:
            stats = illava.last_stats(model)
            llm_in, final = int(stats.llm_image_tokens[0].sum()), int(stats.llm_image_tokens[-1].sum())
        else:
            llm_in = final = image_tokens
        rows.append(
            DemoRow(
                label,
                schedule,
                llm_in,
                final,
                timing,
                illava.predicted_speedup(model.config, schedule, grids, text_tokens),
            )
        )
    illava.remove(model)
    return rows


def format_table(rows: list[DemoRow]) -> str:
    base = rows[0].prefill.median
    header = f"{'schedule':<16}{'img tokens->LLM':>16}{'after LLM':>11}{'prefill ms':>12}{'spread':>8}{'speedup':>9}{'predicted':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.label:<16}{row.llm_image_tokens:>16}{row.final_image_tokens:>11}"
            f"{row.prefill.median * 1e3:>12.1f}{row.prefill.spread:>8.0%}"
            f"{base / row.prefill.median:>8.2f}x{row.predicted:>10.2f}x"
        )
    return "\n".join(lines)
