"""`python -m jobs run JOB_ID --database URL`: the detached driver process `submit` starts (`jobs.start_background`)."""

import argparse
import sys

from db import Database

from .cluster import TIMEOUT_ENV
from .driver import run
from .lease import driver_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("job")
    parser.add_argument("--database", help="database URL (default: DATABASE_URL or sqlite:///illava.db)")
    parser.add_argument("--ray-address")
    parser.add_argument("--ray-timeout", type=float,
                        help=f"seconds joining the Ray cluster may take (default: ${TIMEOUT_ENV}, else 30)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="take over a job whose driver's lease has expired")
    # Set by `jobs.start_background`: the process that started this driver holds the job's lease for it.
    parser.add_argument("--handed-from", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    database = Database(args.database)
    owner = driver_id(token=args.token) if args.token else None
    try:
        database.check_schema()
        status = run(database, args.job, ray_address=args.ray_address, ray_timeout_s=args.ray_timeout, force=args.force,
                     owner=owner, handed_from=args.handed_from,
                     on_progress=lambda p: print(f"{p.done}/{p.total} trials, front {p.front_size}", flush=True))  # fmt: skip
    except (ValueError, LookupError, RuntimeError, KeyboardInterrupt) as error:  # the job is marked already
        print(f"job {args.job}: {type(error).__name__}: {error}", flush=True)
        return 1
    print(f"job {args.job}: {status}", flush=True)
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
