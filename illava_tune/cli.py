"""The `illava-tune` command. Thin: every subcommand calls a function the tests call too."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    rows = run_demo(args.backbone, image_size=args.image_size, repeats=args.repeats, warmup=args.warmup,
                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))  # fmt: skip
    print(f"backbone {args.backbone}, one {args.image_size}x{args.image_size} image, prefill = one forward pass")
    print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="illava-tune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="vanilla vs iLLaVA at the paper's ratios on a built-in backbone")
    demo.add_argument("--backbone", default="small", help="tiny, small, or a local checkpoint directory")
    demo.add_argument("--image-size", type=int, default=448)
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per schedule (median reported)")
    demo.add_argument("--warmup", type=int, default=1)
    demo.set_defaults(run=_demo)

    profile = commands.add_parser("profile", help="measure one schedule on one workload against the unmerged model")
    profile.add_argument("--backbone", default="small", help="tiny, small, or a local checkpoint directory")
    profile.add_argument("--method", default="illava", help="illava, prune or random")
    profile.add_argument("--reduction", type=float, default=0.778, help="fraction of image tokens removed")
    profile.add_argument("--encoder-share", type=float, help="fraction of the removal done in the encoder (0.4)")
    profile.add_argument("--schedule", help="a schedule or manifest JSON file (overrides the three above)")
    profile.add_argument("--workload", default=None, help="a preset name or a YAML/JSON file (default single-448)")
    profile.add_argument("--dataset", help="a labelled multiple-choice dataset (.tsv, .jsonl, .parquet)")
    profile.add_argument("--limit", type=int, help="number of samples (dataset rows or synthetic samples)")
    profile.add_argument(
        "--score",
        default="logits",
        choices=["logits", "generate"],
        help="how a dataset answer is read: option-letter logits (default) or parsed generation",
    )
    profile.add_argument("--repeats", type=int, default=5, help="timed prefill runs (median, p90, spread)")
    profile.add_argument("--warmup", type=int, default=2)
    profile.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    profile.add_argument("--json", help="write the reference and the result as JSON here")
    profile.add_argument("--quiet", action="store_true", help="no progress bar")
    profile.set_defaults(run=_lazy("run_profile"))

    hardware = commands.add_parser("hardware", help="print the detected hardware profile")
    hardware.add_argument("--device", default="cuda" if _cuda() else "cpu")
    hardware.set_defaults(run=_lazy("run_hardware"))
    return parser


def _lazy(name: str):
    def run(args: argparse.Namespace) -> int:
        from . import profile

        return getattr(profile, name)(args)

    return run


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"illava-tune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
