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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"illava-tune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
