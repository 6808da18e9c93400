"""`illava-tune serve | token | publish | retire | pull`: the schedule service and what deployments
and operators do with it. Thin over `illava_tune.server`, `jobs` and `illava.fetch_manifest`."""

from __future__ import annotations

import os
import sys
import urllib.parse

from .tune import _database, format_front


def cmd_serve(args) -> int:
    import uvicorn

    from .server import create_app

    if args.ray_address:  # the drivers of the jobs it starts inherit it
        os.environ["RAY_ADDRESS"] = args.ray_address
    database = _database(args, create=True)
    reads = "public" if args.public_reads else "need a read token"
    print(f"illava-tune schedule service on http://{args.host}:{args.port} (database {database.masked_url}; "
          f"reads {reads}, writes need a write token; OpenAPI at /docs)", file=sys.stderr)  # fmt: skip
    app = create_app(database, public_reads=args.public_reads)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_token(args) -> int:
    from .server import tokens

    database = _database(args, create=args.action == "create")
    if args.action == "create":
        token, info = tokens.create(database, scope=args.scope, name=args.name)
        print(token)
        print(f"token {info.key} ({info.name!r}, scope {info.scope}): shown once, only its hash is stored; "
              "send it as `Authorization: Bearer TOKEN` or set ILLAVA_TOKEN", file=sys.stderr)  # fmt: skip
        return 0
    if args.action == "revoke":
        if not (args.token or args.name):
            raise ValueError("`token revoke` needs the token's key or name: `illava-tune token revoke KEY`")
        info = tokens.revoke(database, args.token or args.name)
        print(f"revoked token {info.key} ({info.name!r})")
        return 0
    rows = tokens.list_all(database)
    if not rows:
        print("no tokens yet: `illava-tune token create --scope read --name my-fleet`")
    for info in rows:
        used = f"{info.last_used_at:%Y-%m-%d %H:%M}" if info.last_used_at else "never"
        state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "live"
        print(f"{info.key}  {info.scope:<5}  {info.name:<24} created {info.created_at:%Y-%m-%d %H:%M}  "
              f"last used {used}  {state}")  # fmt: skip
    return 0


def cmd_publish(args) -> int:
    import jobs

    database = _database(args)
    if args.trial is not None:
        if args.job is None:
            raise ValueError("--trial needs --job: `illava-tune publish --job JOB --trial N`")
        row = jobs.publish(database, job=args.job, trial=args.trial)
    elif args.schedule_id is not None and args.job is None:
        row = jobs.publish(database, args.schedule_id)
    else:
        raise ValueError("publish a schedule by id (`illava-tune publish ID`) or a trial (`--job JOB --trial N`)")
    print(f"published schedule #{row['id']}: `best` and the service now give it to deployments of "
          f"{row['backbone']} on {row['hardware']} ({row['workload']})")  # fmt: skip
    print(format_front([row]))
    return 0


def cmd_retire(args) -> int:
    import jobs

    row = jobs.retire(_database(args), args.schedule_id)
    print(f"retired schedule #{row['id']}: deployments are no longer given it")
    return 0


def best_url(server: str, **query) -> str:
    """The service's URL of the best schedule's manifest for `query` (None values left out)."""
    kept = {name: value for name, value in query.items() if value is not None and value is not False}
    return f"{server.rstrip('/')}/v1/schedules/best/manifest?{urllib.parse.urlencode(kept)}"


def cmd_pull(args) -> int:
    import illava

    if args.schedule is not None:
        url = f"{args.server.rstrip('/')}/v1/schedules/{args.schedule}/manifest"
    else:
        if (args.latency_ms is None) == (args.speedup is None) or not args.backbone:
            raise ValueError("pull takes --schedule ID, or --backbone with one target (--latency-ms or --speedup)")
        url = best_url(args.server, backbone=args.backbone, latency_ms=args.latency_ms, speedup=args.speedup,
                       hardware=args.hardware, workload=args.workload, dtype=args.dtype, attention=args.attn,
                       max_memory_mib=args.max_memory_mib, min_retention=args.min_retention,
                       candidates="true" if args.candidates else None)  # fmt: skip
    fetched = illava.fetch_manifest(url, token=args.token, cache=args.output)
    provenance = fetched.manifest.get("provenance") or {}
    what = f"schedule #{provenance.get('schedule', '?')}: {illava.Schedule.coerce(fetched.manifest).describe()}"
    if fetched.stale:
        print(f"{args.output}: the service could not be reached; kept {what}")
    elif fetched.changed:
        print(f"{args.output}: updated to {what}")
    else:
        print(f"{args.output}: unchanged, {what}")
    if fetched.target_met is False:
        print("note: no published schedule meets the target; this is the fastest there is", file=sys.stderr)
    return 0
