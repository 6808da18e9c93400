"""The `illava-tune` command. Thin: every subcommand calls a function the tests call too."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    rows = run_demo(args.backbone, image_size=args.image_size, repeats=args.repeats, warmup=args.warmup,
                    dtype=args.dtype, attention=args.attn,
                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))  # fmt: skip
    print(f"backbone {args.backbone} in {args.dtype} with {args.attn} attention, one {args.image_size}x"
          f"{args.image_size} image, prefill = one forward pass")  # fmt: skip
    print(format_table(rows))
    return 0


# `profile` and `submit` default to the trained `demo` backbone: its workload (demo-vqa) is labelled, so
# accuracy is a real objective (seeded-weight built-ins only have fidelity to the unmerged model).
# The speed demo (`illava-tune demo`) stays on `small`: on demo's 4.5M parameters the merge bookkeeping
# costs about what the removed tokens save, so there is no speedup to show (docs/benchmarks.md).
DEFAULT_BACKBONE = "demo"
BACKBONE_HELP = (
    "demo (trained, committed: illava/checkpoints/demo); tiny, small, tiny-qwen2-vl, tiny-qwen3-vl, "
    "tiny-llava-onevision (seeded weights); or a local checkpoint directory of a supported family, "
    "found by its config.json's model_type (default: %(default)s)"
)
WORKLOAD_HELP = "a preset name or a YAML/JSON file (default: demo-vqa for the demo backbone, else single-448)"
# Mirrors illava.runtime.DTYPES / ATTENTIONS (tests hold them equal): the parser imports no torch.
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("eager", "sdpa", "flash_attention_2", "illava_packed")
# jobs.cluster.TIMEOUT_ENV (the parser imports nothing of jobs: that would import torch).
RAY_TIMEOUT_HELP = (
    "seconds to wait for the Ray cluster at --ray-address / $RAY_ADDRESS to answer before the job fails with a "
    "one-line error (default: $ILLAVA_RAY_CONNECT_TIMEOUT, else 30)"
)


def _runtime_args(parser: argparse.ArgumentParser, *, filters: bool = False) -> None:
    """--dtype and --attn: what the model runs in (or, with `filters`, which tuned schedules to pick)."""
    if filters:
        parser.add_argument("--dtype", choices=DTYPES, help="only schedules tuned in this dtype")
        parser.add_argument("--attn", choices=ATTENTIONS, help="only schedules tuned with this attention")
        return
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="the dtype the model runs in; tune in what you deploy (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--attn", default="sdpa", choices=ATTENTIONS,
        help="attention implementation: illava_packed makes one call per vision block (merged or not); "
        "flash_attention_2 needs CUDA and flash-attn (default: %(default)s)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="illava-tune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="vanilla vs iLLaVA at the paper's ratios on a built-in backbone")
    demo.add_argument("--backbone", default="small", help=BACKBONE_HELP)
    demo.add_argument("--image-size", type=int, default=448)
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per schedule (median reported)")
    demo.add_argument("--warmup", type=int, default=1)
    _runtime_args(demo)
    demo.set_defaults(run=_demo)

    profile = commands.add_parser("profile", help="measure one schedule on one workload against the unmerged model")
    profile.add_argument("--backbone", default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
    profile.add_argument("--method", default="illava",
                         help="illava, prune, random, fastv, pdrop, sparsevlm, tome, visionzip, divprune or downsample; "
                         "placed on the stages it acts at")  # fmt: skip
    profile.add_argument("--reduction", type=float, default=0.778, help="fraction of image tokens removed")
    profile.add_argument("--encoder-share", type=float, help="fraction of the removal done in the encoder (0.4)")
    profile.add_argument("--schedule", help="a schedule or manifest JSON file (overrides the three above)")
    profile.add_argument("--workload", default=None, help=WORKLOAD_HELP)
    profile.add_argument("--dataset", help="a labelled multiple-choice dataset (.tsv, .jsonl, .parquet, or demo)")
    profile.add_argument("--limit", type=int, help="number of samples (dataset rows or synthetic samples)")
    profile.add_argument(
        "--score",
        default=None,
        choices=["logits", "generate", "options"],
        help="how a dataset answer is read: option-letter logits, parsed generation, or the likelihood of "
        "each option's text (default: options for a model whose config says mcq_answer=text, such as demo; "
        "else logits)",
    )
    profile.add_argument("--repeats", type=int, default=5, help="timed prefill runs (median, p90, spread)")
    profile.add_argument("--warmup", type=int, default=2)
    profile.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    _runtime_args(profile)
    profile.add_argument("--json", help="write the reference and the result as JSON here")
    profile.add_argument("--quiet", action="store_true", help="no progress bar")
    profile.set_defaults(run=_lazy("run_profile"))

    _tuning_commands(commands)

    train = commands.add_parser("train-demo", add_help=False,
                                help="train the demo backbone (options: illava-tune train-demo --help)")  # fmt: skip
    train.set_defaults(run=lambda args: _train_demo(args.extra))

    hardware = commands.add_parser("hardware", help="print the detected hardware profile")
    hardware.add_argument("--device", default="cuda" if _cuda() else "cpu")
    _runtime_args(hardware)
    hardware.set_defaults(run=_lazy("run_hardware"))
    return parser


def _tuning_commands(commands) -> None:
    db_help = "database URL (default: $DATABASE_URL, else sqlite:///illava.db)"
    submit = commands.add_parser("submit", help="submit a tuning job: Optuna search of schedules on Ray workers")
    submit.add_argument("--backbone", default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
    submit.add_argument("--workload", default=None, help=WORKLOAD_HELP)
    submit.add_argument(
        "--dataset", help="a labelled multiple-choice dataset (file, or demo): accuracy becomes an objective"
    )
    submit.add_argument("--limit", type=int, help="dataset rows (or synthetic samples) per measurement")
    submit.add_argument("--trials", type=int, default=12)
    submit.add_argument("--workers", type=int, default=1, help="CPU workers (GPU clusters: one per GPU)")
    submit.add_argument("--reduction", default="0.5:0.95", help="a ratio (0.778) or a range (0.5:0.95)")
    submit.add_argument(
        "--encoder-share", default="0:0.8", help="share of the removal done in the encoder: a value (0) or a range"
    )
    submit.add_argument(
        "--methods", default="illava",
        help="reduction methods to search, comma-separated: illava, prune, random, fastv, pdrop, sparsevlm, tome, "
        "visionzip, divprune, downsample (each with its own parameters and stages; the front says which wins "
        "where) (default: %(default)s)",
    )  # fmt: skip
    submit.add_argument("--min-retention", type=float, help="accuracy retention floor, e.g. 0.95")
    submit.add_argument("--max-memory-mib", type=float, help="peak memory cap")
    submit.add_argument("--max-latency-ms", type=float, help="prefill latency cap")
    submit.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"])
    submit.add_argument("--seed", type=int, default=0)
    _runtime_args(submit)
    submit.add_argument("--wait", action="store_true", help="run in this process with a progress bar, print the front")
    submit.add_argument(
        "--objective", default="speedup", choices=["speedup", "latency"],
        help="the speed the search optimises: the speedup over the unmerged model measured in the same "
        "interleaved rounds (robust to a machine that drifts), or the median prefill in ms (default: %(default)s)",
    )  # fmt: skip
    target = submit.add_mutually_exclusive_group()
    target.add_argument("--latency-ms", type=float, help="with --wait: also print the best schedule under this target")
    target.add_argument("--speedup", type=float,
                        help="with --wait: also print the most accurate schedule at least this many times faster "
                        "than the unmerged model (a target that means the same on any machine)")  # fmt: skip
    submit.add_argument("--ray-address", help="a Ray cluster (default: $RAY_ADDRESS, else a local one)")
    submit.add_argument("--ray-timeout", type=float, metavar="SECONDS", help=RAY_TIMEOUT_HELP)
    submit.add_argument("--database", help=db_help)
    submit.set_defaults(run=_lazy("cmd_submit", "tune"))

    for name, helptext in (("status", "progress of a job"), ("cancel", "stop a job between trials"),
                           ("resume", "continue a job whose driver stopped"), ("pareto", "print a job's front and plot it")):  # fmt: skip
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("job", help="job id (a unique prefix is enough)")
        sub.add_argument("--database", help=db_help)
        if name == "pareto":
            sub.add_argument("--plot", help="PNG path (default pareto-JOB.png)")
        if name == "resume":
            sub.add_argument("--ray-address", help="a Ray cluster (default: $RAY_ADDRESS, else a local one)")
            sub.add_argument("--ray-timeout", type=float, metavar="SECONDS", help=RAY_TIMEOUT_HELP)
            sub.add_argument(
                "--force", action="store_true",
                help="take the job over from a driver whose lease has expired (never from one whose lease is live)",
            )  # fmt: skip
        sub.set_defaults(run=_lazy(f"cmd_{name}", "tune"))

    jobs = commands.add_parser("jobs", help="list tuning jobs")
    jobs.add_argument("--database", help=db_help)
    jobs.set_defaults(run=_lazy("cmd_jobs", "tune"))

    best = commands.add_parser("best", help="the best published schedule for a latency or speedup target")
    best.add_argument("--backbone", required=True)
    target = best.add_mutually_exclusive_group(required=True)
    target.add_argument("--latency-ms", type=float, help="at most this prefill latency, on the hardware tuned on")
    target.add_argument("--speedup", type=float,
                        help="at least this many times faster than the unmerged model measured in the same job")  # fmt: skip
    best.add_argument("--hardware", help="hardware key (see `illava-tune hardware`)")
    best.add_argument("--workload", help="workload name")
    _runtime_args(best, filters=True)
    best.add_argument("--max-memory-mib", type=float)
    best.add_argument("--min-retention", type=float)
    best.add_argument("--candidates", action="store_true",
                      help="choose among the candidates on fronts too, not only the published schedules")  # fmt: skip
    best.add_argument("--database", help=db_help)
    best.set_defaults(run=_lazy("cmd_best", "tune"))

    export = commands.add_parser("export", help="write a published schedule's manifest (illava.apply accepts it)")
    export.add_argument("schedule_id", type=int)
    export.add_argument("--format", default="json", choices=["json", "yaml"])
    export.add_argument("-o", "--output")
    export.add_argument("--database", help=db_help)
    export.set_defaults(run=_lazy("cmd_export", "tune"))

    _service_commands(commands, db_help)

    database = commands.add_parser("db", help="database schema: upgrade, check, or stamp (record a revision)")
    database.add_argument("action", choices=["upgrade", "check", "stamp"])
    database.add_argument("revision", nargs="?",
                          help="stamp only: the revision the tables are at, recorded without migrating (default: head)")  # fmt: skip
    database.add_argument("--database", help=db_help)
    database.set_defaults(run=_lazy("cmd_db", "tune"))


def _service_commands(commands, db_help: str) -> None:
    publish = commands.add_parser("publish", help="give a schedule to deployments (best, the service and pull)")
    publish.add_argument("schedule_id", type=int, nargs="?", help="a schedule id (from pareto or best)")
    publish.add_argument("--job", help="with --trial: publish this job's trial (on its front or not)")
    publish.add_argument("--trial", type=int, help="the trial number to publish")
    publish.add_argument("--database", help=db_help)
    publish.set_defaults(run=_lazy("cmd_publish", "service"))
    retire = commands.add_parser("retire", help="withdraw a published schedule from deployments")
    retire.add_argument("schedule_id", type=int)
    retire.add_argument("--database", help=db_help)
    retire.set_defaults(run=_lazy("cmd_retire", "service"))

    serve = commands.add_parser("serve", help="the HTTP schedule service deployments pull from")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--public-reads", action="store_true", help="reads need no token (writes always do)")
    serve.add_argument(
        "--ray-address", help="the Ray cluster submitted jobs run on (default: $RAY_ADDRESS, else local)"
    )
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--database", help=db_help)
    serve.set_defaults(run=_lazy("cmd_serve", "service"))

    token = commands.add_parser("token", help="tokens of the schedule service: create, list, revoke")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("token", nargs="?", help="revoke: the token's key or name")
    token.add_argument("--scope", choices=["read", "write"], default="read",
                       help="create: read (schedules, jobs) or write (submit, cancel, resume, publish, retire; "
                       "reads too) (default: %(default)s)")  # fmt: skip
    token.add_argument("--name", dest="name", help="create: a name to know it by (default: SCOPE-KEY)")
    token.add_argument("--database", help=db_help)
    token.set_defaults(run=_lazy("cmd_token", "service"))

    pull = commands.add_parser("pull", help="fetch the best published schedule's manifest from the service")
    pull.add_argument("--server", required=True, help="the service's URL, e.g. http://tuner:8000")
    pull.add_argument("--schedule", type=int, help="a schedule id instead of a target")
    pull.add_argument("--backbone")
    target = pull.add_mutually_exclusive_group()
    target.add_argument("--latency-ms", type=float, help="at most this prefill latency")
    target.add_argument("--speedup", type=float, help="at least this many times faster than the unmerged model")
    pull.add_argument("--hardware", help="hardware key")
    pull.add_argument("--workload", help="workload name")
    _runtime_args(pull, filters=True)
    pull.add_argument("--max-memory-mib", type=float)
    pull.add_argument("--min-retention", type=float)
    pull.add_argument("--candidates", action="store_true", help="choose among unpublished candidates too")
    pull.add_argument("-o", "--output", required=True, help="the manifest file; rewritten only when the answer changed")
    pull.add_argument("--token", help="a read token (default: $ILLAVA_TOKEN)")
    pull.set_defaults(run=_lazy("cmd_pull", "service"))


def _train_demo(argv: list[str]) -> int:
    from .train_demo import main

    return main(argv)


def _lazy(name: str, module: str = "profile"):
    """Import the command's module only when it runs: `illava-tune demo` never imports Ray or SQL."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"illava_tune.{module}"), name)(args)

    return run


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train-demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, LookupError, RuntimeError) as error:
        print(f"illava-tune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or a signal that stopped a driver (which marked its job)
        print(f"illava-tune: {stop or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
