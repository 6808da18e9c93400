"""Connecting a job driver to Ray: a local cluster, or the cluster `RAY_ADDRESS` names.

`ray.init(address=...)` alone makes a poor front door for a CLI: where nothing listens it retries
for over ten minutes (20 attempts of about 40 s, SIGTERM deferred while it blocks in C++); a
cluster from `ray start` (token authentication is on there once `~/.ray/auth_token` exists, which
any local `ray.init()` creates) rejects a driver without `RAY_AUTH_MODE=token` with a traceback; and
Ray's notices land in the middle of the CLI's progress bar. `connect` probes the address first
within a timeout, lets `ray.init` make a single attempt, keeps Ray's notices off the terminal, and
turns every failure into a one-line `ClusterError` that says what to check. How long it waits is
`connect_timeout()`: 30 s unless `ILLAVA_RAY_CONNECT_TIMEOUT` (or the caller) says otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TIMEOUT_ENV", "ClusterError", "connect", "connect_timeout", "disconnect"]

TIMEOUT_ENV = "ILLAVA_RAY_CONNECT_TIMEOUT"  # seconds joining a cluster may take (the CLI's --ray-timeout)
DEFAULT_TIMEOUT_S = 30.0

# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers at once with
# its own SETTINGS frame (type 4); a server of another protocol answers something else, or nothing.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_TOKEN_HELP = "RAY_AUTH_TOKEN=<the output of `ray get-auth-token` on the head node>"


class ClusterError(RuntimeError):
    """Ray could not be reached or started. The message is one line: the address, what failed and
    what to check or which variable to set. It never contains a token."""


def connect_timeout(seconds: float | str | None = None) -> float:
    """How long joining a Ray cluster may take, in seconds: `seconds`, else `$ILLAVA_RAY_CONNECT_TIMEOUT`,
    else 30. ValueError, naming where the value came from, for anything but a finite number > 0."""
    source, value = "the Ray connection timeout", seconds
    if value is None:
        source, value = TIMEOUT_ENV, os.environ.get(TIMEOUT_ENV) or None
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout < float("inf"):
        raise ValueError(f"{source} must be a number of seconds > 0 (default {DEFAULT_TIMEOUT_S:g}), got {value!r}")
    return timeout


def connect(address: str | None = None, *, timeout_s: float | None = None) -> bool:
    """Initialize Ray in this process; True means this call did, so the caller `disconnect`s later.
    False (nothing done) when Ray is already initialized: whoever did owns the shutdown.

    `address`, else `$RAY_ADDRESS`: unset or "local" starts a local cluster (unless `ray start` runs on
    this machine: Ray joins that one); "HOST:PORT" (the GCS port `ray start --head` prints) or "auto"
    (the `ray start` cluster of this machine) joins a cluster; "ray://HOST:PORT" goes through Ray Client.
    Raises `ClusterError` within about `timeout_s` (default `connect_timeout()`) when nothing answers
    there, when what answers is not Ray, or when the cluster wants a token this process does not send."""
    import ray

    timeout_s = connect_timeout(timeout_s)
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS") and address in (None, "", "auto"):  # the precedence ray.init applies
        address = os.environ["RAY_ADDRESS"]
    address = address or None
    implicit = address in (None, "auto")  # the only forms for which Ray sends a token it finds by itself
    target = None if address == "local" else _probe(address, timeout_s)
    _ray_init(address, target, _label(address, target), implicit)
    return True


def disconnect(started: bool) -> None:
    """Shut Ray down when `connect` started it (an external cluster keeps running; this process leaves it)."""
    if started:
        import ray

        ray.shutdown()


def _probe(address: str | None, timeout_s: float) -> str | None:
    """The `host:port` ray.init will dial, seen to answer within `timeout_s` (None: Ray starts a local cluster)."""
    from ray._private import services  # ray.init's own resolution: "auto", `ray start` here, loopback -> node IP

    if address and address.startswith("ray://"):
        if importlib.util.find_spec("grpc") is None:
            raise ClusterError(f"Ray address {address} is Ray Client, which needs `pip install 'ray[client]'`; "
                               "or run on a node of the cluster with RAY_ADDRESS=HEAD:6379")  # fmt: skip
        server = address.removeprefix("ray://")
        return _answers(address, server if ":" in server else f"{server}:10001", timeout_s, gcs=False)
    try:
        target = services.canonicalize_bootstrap_address(address)
    except (ValueError, ConnectionError) as error:
        raise ClusterError(f"Ray address {address!r}: {_reason(error)} (allowed: HOST:PORT, auto, "
                           "ray://HOST:PORT, or unset for a local cluster)") from error  # fmt: skip
    return None if target is None else _answers(_label(address, target), target, timeout_s, gcs=True)


def _label(address: str | None, target: str | None) -> str:
    """How messages name the cluster: as the user wrote it, or what Ray found for unset / "auto"."""
    if address not in (None, "auto"):
        return str(address)
    return f"{target} (the `ray start` cluster Ray found on this machine for {address or 'no address'})"


def _answers(address: str, target: str, timeout_s: float, *, gcs: bool) -> str:
    """`target` once it accepts a connection and, for a GCS, answers an HTTP/2 hello, all within `timeout_s`."""
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + timeout_s
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except (OSError, ValueError) as error:
        reason = "no answer" if isinstance(error, TimeoutError) else getattr(error, "strerror", None) or error
        raise ClusterError(f"no Ray cluster at {address}: cannot connect to {target} within {timeout_s:g} s "
                           f"({reason}); check RAY_ADDRESS, that `ray start --head --port={port}` runs there, "
                           "and firewalls") from error  # fmt: skip
    with sock:
        if not gcs or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return target  # a TLS handshake would have to come first: accepting connections must do
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(_HTTP2_HELLO)
            reply = sock.makefile("rb").read(9)
        except OSError:  # a timeout included: silence is not how a GCS greets
            reply = b""
    if len(reply) < 4 or reply[3] != 4:
        raise ClusterError(f"{address} is not a Ray cluster: {target} accepts connections but gave no answer of Ray's "
                           f"GCS (gRPC) within {timeout_s:g} s; use the port `ray start --head` prints (6379 unless "
                           f"--port), or allow more time with {TIMEOUT_ENV}")  # fmt: skip
    return target


def _ray_init(address: str | None, target: str | None, label: str, implicit: bool) -> None:
    """ray.init as the driver has always called it: quiet, one GCS attempt, every failure a ClusterError."""
    import ray

    try:
        with _quiet_single_attempt(connecting=target is not None):
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as error:
        if target is None:
            raise ClusterError(f"could not start a local Ray cluster: {_reason(error)}") from error
        if _rejected_token(error):
            raise ClusterError(_token_advice(label, implicit)) from error
        raise ClusterError(f"could not join the Ray cluster at {label}: {_reason(error)} (a driver runs "
                           "on a node of the cluster: the head, or one that ran `ray start --address`)") from error  # fmt: skip


def _token_advice(address: str, implicit: bool) -> str:
    """Which variable to set, from where Ray reads a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then
    ~/.ray/auth_token, in that order) and whether it sends one; never the token itself."""
    default = Path.home() / ".ray" / "auth_token"
    source = next((name for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH") if os.environ.get(name)), None)
    source = source or (str(default) if default.is_file() and default.stat().st_size else None)
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" and not (implicit and source):
        return (f"the Ray cluster at {address} requires its authentication token: set RAY_AUTH_MODE=token "
                f"(the head node reads the token from ~/.ray/auth_token; elsewhere also set {_TOKEN_HELP})")  # fmt: skip
    if source is None:
        return f"RAY_AUTH_MODE=token but no token for the Ray cluster at {address} was found: set {_TOKEN_HELP}"
    return f"the Ray cluster at {address} rejected the token from {source}: set {_TOKEN_HELP}"


def _rejected_token(error: BaseException | None) -> bool:
    from ray.exceptions import AuthenticationError

    while error is not None:  # ray.init wraps the GCS's refusal: ConnectionError <- RuntimeError(traceback text)
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reason(error: BaseException) -> str:
    """One line of why: the first line of a plain error, the last of the innermost cause (ray.init wraps the
    real error's traceback text in a RuntimeError, and that in a ConnectionError)."""
    inner = error
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = str(inner).strip().splitlines()
    return (lines[-1] if inner is not error else lines[0]) if lines else type(inner).__name__


@contextlib.contextmanager
def _quiet_single_attempt(*, connecting: bool) -> Iterator[None]:
    """Ray's INFO and WARNING lines ("Token authentication is enabled ...") off the terminal, where they would
    land in the progress bar (errors still show); and, joining a cluster the probe just saw answer, a single
    GCS connection attempt (ray.init reads RAY_gcs_server_port_wait_time_s) instead of twenty."""
    ray_logger, attempts = logging.getLogger("ray"), "RAY_gcs_server_port_wait_time_s"
    level, set_attempts = ray_logger.level, connecting and attempts not in os.environ
    ray_logger.setLevel(logging.ERROR)
    if set_attempts:
        os.environ[attempts] = "1"
    try:
        yield
    finally:
        ray_logger.setLevel(level)
        if set_attempts:
            os.environ.pop(attempts, None)
