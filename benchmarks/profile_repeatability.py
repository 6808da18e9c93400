"""How repeatable is the profiler's prefill time? The same schedule measured N times in one
process and once in each of M fresh processes; reports the coefficient of variation (stdev/mean)
of the measured prefill medians, and the median within-measurement CV.

    python benchmarks/profile_repeatability.py                 # small, single-448, 10 in-process, 3 fresh
    python benchmarks/profile_repeatability.py --backbone tiny --in-process 5 --processes 2

Target (issue 3): under 5% on an idle CPU. Latency only: one synthetic sample, 4 output tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import illava  # noqa: E402
from profiler import Profiler, resolve_workload  # noqa: E402


def measure(backbone: str, workload_name: str, reduction: float, count: int, repeats: int) -> list[dict]:
    profiler = Profiler(backbone, repeats=repeats, warmup=2)
    workload = dataclasses.replace(resolve_workload(workload_name), samples=1, output_tokens=4)
    schedule = illava.paper_default_for(profiler.model, reduction)
    results = []
    for index in range(count):
        result = profiler.measure(schedule, workload)
        results.append({"median": result.prefill_s.median, "cv": result.prefill_s.cv})
        print(f"  measurement {index + 1}/{count}: {result.prefill_s.median * 1e3:.1f} ms", file=sys.stderr)
    return results


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small")
    parser.add_argument("--workload", default="single-448")
    parser.add_argument("--reduction", type=float, default=7 / 9)
    parser.add_argument("--in-process", type=int, default=10)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs inside each measurement")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args.backbone, args.workload, args.reduction, 1, args.repeats)[0]))
        return 0

    same = measure(args.backbone, args.workload, args.reduction, args.in_process, args.repeats)
    fresh = []
    for index in range(args.processes):
        print(f"fresh process {index + 1}/{args.processes} ...", file=sys.stderr)
        command = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--workload", args.workload,
                   "--reduction", str(args.reduction), "--repeats", str(args.repeats)]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        fresh.append(json.loads(out.strip().splitlines()[-1]))

    print(f"`python benchmarks/profile_repeatability.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(f"backbone {args.backbone}, workload {args.workload}, reduction {args.reduction:.3f}, "
          f"{args.repeats} timed runs per measurement\n")  # fmt: skip
    print("| where | measurements | prefill median ms (min-max) | CV across measurements | median CV within |")
    print("|---|---:|---:|---:|---:|")
    for label, rows in (("one process", same), ("fresh processes", fresh)):
        medians = [r["median"] * 1e3 for r in rows]
        print(
            f"| {label} | {len(rows)} | {statistics.median(medians):.1f} ({min(medians):.1f}-{max(medians):.1f}) "
            f"| {cv(medians):.1%} | {statistics.median(r['cv'] for r in rows):.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
