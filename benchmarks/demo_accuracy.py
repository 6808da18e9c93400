"""Accuracy of the trained `demo` backbone on the demo VQA test split, unmerged and merged.

    python benchmarks/demo_accuracy.py                     # 500 test questions, 5 random-drop seeds
    python benchmarks/demo_accuracy.py --markdown docs/benchmarks.md
    python benchmarks/demo_accuracy.py --device cuda       # fp32 on a GPU: a cross-check of the CPU table
    python benchmarks/demo_accuracy.py --stages --seeds 2  # importance vs random, encoder-only and LLM-only

At each of the paper's ratios (66.7/77.8/88.9% of image tokens removed) it scores:

- ``iLLaVA``: the paper's default (40% of the removal in the encoder, 60% in the LLM, paper layers
  mapped onto the demo model's depths), importance selection with recycling;
- ``encoder-only`` / ``LLM-only``: the same removal done all in the encoder / all in the LLM;
- ``prune``: the paper's split and layers, importance selection without recycling;
- ``random``: the paper's split and layers, uniformly random kept tokens, over `--seeds` seeds.

Inference is deterministic, so a deterministic method has no run-to-run spread; random dropping's
spread is over its seeds (mean, sd, min-max). The margin of iLLaVA over random also gets a 95% paired
bootstrap interval over questions (iLLaVA vs the mean of the random seeds, 2000 resamples), which
accounts for the finite test set. Prints a markdown table; `--markdown FILE` appends it with the
command and machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import illava  # noqa: E402
from illava import PAPER_REDUCTIONS  # noqa: E402
from illava.backbones import load_backbone  # noqa: E402
from profiler.accuracy import choose  # noqa: E402
from profiler.demo_vqa import CATEGORIES, demo_split  # noqa: E402
from profiler.hardware import cpu_model, resolve_device  # noqa: E402


def right_answers(items, choices) -> np.ndarray:
    """One 0/1 per item: whether the choice is its answer."""
    return np.array([c == item.answer for item, c in zip(items, choices, strict=True)], dtype=float)


def bootstrap(diff: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of per-question differences `diff`, resampling questions."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def score_schedule(backbone, items, schedule, batch_size: int) -> np.ndarray:
    """One 0/1 per item: `backbone` under `schedule` (None: unmerged) right on it, the inputs built for
    the schedule (a ``downsample`` one resizes the images); leaves the model unmerged."""
    model = backbone.model
    illava.remove(model)
    if schedule is not None:
        illava.apply(model, schedule)
    try:
        return right_answers(items, choose(backbone, items, batch_size=batch_size, schedule=schedule))
    finally:
        illava.remove(model)


def _scorer(backbone_name: str, n_items: int, batch_size: int, device: str):
    """The model, the test items, and a function scoring one schedule (None: unmerged) on them:
    one 0/1 per item."""
    backbone = load_backbone(backbone_name)
    model = backbone.model.to(resolve_device(device))
    items = demo_split("test", n_items)
    return model, items, lambda schedule: score_schedule(backbone, items, schedule, batch_size)


def versus_random(hits: np.ndarray, random_hits: list[np.ndarray], cell=lambda acc: f"{acc:.1%}") -> tuple[str, str]:
    """Two table cells: random dropping's accuracy over its seeds (mean, sd, min-max), and the margin
    of `hits` over that mean with a 95% paired bootstrap interval over questions."""
    accs = [float(h.mean()) for h in random_hits]
    mean = statistics.mean(accs)
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    low, high = bootstrap(hits - np.mean(random_hits, axis=0))
    return (
        f"{cell(mean)}, sd {sd:.1%}, {min(accs):.1%}-{max(accs):.1%}",
        f"{hits.mean() - mean:+.1%} [{low:+.1%}, {high:+.1%}]",
    )


def run(backbone_name: str, n_items: int, seeds: int, batch_size: int, log=print, device: str = "cpu") -> str:
    model, items, score = _scorer(backbone_name, n_items, batch_size, device)
    start = time.perf_counter()
    base = score(None)
    log(f"unmerged: {base.mean():.3f}")

    def cell(acc: float) -> str:
        return f"{acc:.1%} ({acc / base.mean():.1%})"

    rows = []
    for ratio in PAPER_REDUCTIONS:
        paper = illava.paper_default_for(model, ratio)
        methods = {
            "iLLaVA": paper,
            "encoder-only": paper.with_(encoder_share=1.0),
            "LLM-only": paper.with_(encoder_share=0.0),
            "prune (no recycling)": paper.with_(method="prune"),
        }
        hits = {name: score(schedule) for name, schedule in methods.items()}
        random_hits = [score(paper.with_(method="random", seed=seed)) for seed in range(seeds)]
        rows.append((ratio, hits, versus_random(hits["iLLaVA"], random_hits, cell)))
        log(f"{ratio:.1%}: " + " ".join(f"{k}={v.mean():.3f}" for k, v in hits.items())
            + f" random={[float(h.mean()) for h in random_hits]}")  # fmt: skip
    seconds = time.perf_counter() - start
    lines = [
        f"Unmerged `{backbone_name}`: **{base.mean():.1%}** on {len(items)} test questions "
        f"(chance 25%); by type: " + ", ".join(f"{c} {_mean_of(base, items, c):.1%}" for c in CATEGORIES) + ".",
        "",
        "Accuracy (retention = accuracy / unmerged accuracy) at each reduction:",
        "",
        "| removed | iLLaVA | encoder-only | LLM-only | prune (no recycling) | random: mean (retention), sd, min-max "
        f"over {seeds} seeds | iLLaVA - random, 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio, hits, (random_cell, margin) in rows:
        methods_cells = " | ".join(cell(float(h.mean())) for h in hits.values())
        lines.append(f"| {ratio:.1%} | {methods_cells} | {random_cell} | {margin} |")
    lines += ["", "iLLaVA accuracy by question type:", ""]
    lines.append("| removed | " + " | ".join(CATEGORIES) + " |")
    lines.append("|---|" + "---|" * len(CATEGORIES))
    lines.append("| 0% | " + " | ".join(f"{_mean_of(base, items, c):.1%}" for c in CATEGORIES) + " |")
    for ratio, hits, _ in rows:
        lines.append(
            f"| {ratio:.1%} | " + " | ".join(f"{_mean_of(hits['iLLaVA'], items, c):.1%}" for c in CATEGORIES) + " |"
        )
    lines += ["", f"({seconds:.0f} s for all {1 + len(rows) * (4 + seeds)} evaluations)"]
    return "\n".join(lines)


def run_stages(backbone_name: str, n_items: int, seeds: int, batch_size: int, log=print, device: str = "cpu") -> str:
    """Importance vs random selection with the whole removal in one stage: where does importance
    help? Same ratios and layers as `run`; random over `seeds` seeds."""
    model, items, score = _scorer(backbone_name, n_items, batch_size, device)
    start = time.perf_counter()
    lines = [
        f"Importance (iLLaVA) vs random selection, the whole removal in one stage, {len(items)} test questions:",
        "",
        "| removed | stage | importance | random: mean, sd, min-max over "
        f"{seeds} seeds | importance - random, 95% CI |",
        "|---|---|---|---|---|",
    ]
    for ratio in PAPER_REDUCTIONS:
        paper = illava.paper_default_for(model, ratio)
        for stage, share in (("encoder", 1.0), ("LLM", 0.0)):
            staged = paper.with_(encoder_share=share)
            hits = score(staged)
            random_hits = [score(staged.with_(method="random", seed=seed)) for seed in range(seeds)]
            log(f"{ratio:.1%} {stage}: importance={hits.mean():.3f} random={[float(h.mean()) for h in random_hits]}")
            random_cell, margin = versus_random(hits, random_hits)
            lines.append(f"| {ratio:.1%} | {stage} | {hits.mean():.1%} | {random_cell} | {margin} |")
    lines += [
        "",
        f"({time.perf_counter() - start:.0f} s for all {len(PAPER_REDUCTIONS) * 2 * (1 + seeds)} evaluations)",
    ]
    return "\n".join(lines)


def _mean_of(hits: np.ndarray, items, category: str) -> float:
    mask = np.array([item.category == category for item in items])
    return float(hits[mask].mean())


def machine(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(resolve_device(device))}, torch {torch.__version__}, fp32"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__} CPU, fp32"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="demo", help="demo or a checkpoint trained on the demo benchmark")
    parser.add_argument("--items", type=int, default=500, help="test questions (at most 500)")
    parser.add_argument("--seeds", type=int, default=5, help="random-dropping seeds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (fp32 either way)")
    parser.add_argument(
        "--stages", action="store_true", help="instead: importance vs random with the whole removal in one stage"
    )
    parser.add_argument("--markdown", type=Path, help="append the table, command and machine to this file")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    table = (run_stages if args.stages else run)(
        args.backbone, args.items, args.seeds, args.batch_size, log=log, device=args.device
    )
    print(table)
    if args.markdown:
        command = "python benchmarks/demo_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with args.markdown.open("a") as handle:
            handle.write(f"\n`{command.strip()}` on {machine(args.device)}:\n\n{table}\n")


if __name__ == "__main__":
    main()
