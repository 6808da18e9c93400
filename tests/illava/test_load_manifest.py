"""`illava.load_manifest` / `fetch_manifest` against a real HTTP server on 127.0.0.1 that follows the
schedule service's contract: ``ETag`` = quoted sha256 of the body, ``If-None-Match`` -> 304, bearer
auth, ``{"detail": ...}`` errors, ``X-Illava-Target-Met`` on the best-manifest route."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

import illava
from illava import Fetched, ManifestError, ManifestWarning, Schedule, fetch_manifest, load_manifest

TOKEN = "s3cret-token-9f2c"
BEST = "/v1/schedules/best/manifest?backbone=demo&speedup=1.2"


def manifest_for(reduction: float = 0.778) -> dict[str, Any]:
    """A manifest shaped like `jobs.api.manifest`'s export."""
    schedule = Schedule.paper_default(reduction, encoder_depth=8, llm_depth=8)
    return {
        "manifest_version": 1,
        "schedule": schedule.to_dict(),
        "backbone": {"name": "demo", "path": "/models/demo"},
        "workload": {"images": 1, "resolution": [224, 224], "batch_size": 1},
        "hardware": {"gpu": "cpu", "cpu": "test"},
        "metrics": {"speedup": 1.31, "accuracy": 0.9},
        "reference": {"model": "unmerged", "prefill_ms": 12.5, "speedup": 1.31, "job_objective": "accuracy"},
        "provenance": {"job": 1, "trial": 7, "illava-tune": "0.1.0"},
    }


def body_of(manifest: Any) -> bytes:
    return json.dumps(manifest, indent=2).encode()


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest() + '"'


@dataclass
class Service:
    """What the fake schedule service answers, and the requests it received."""

    url: str = ""
    body: bytes = field(default_factory=lambda: body_of(manifest_for()))
    token: str | None = TOKEN  # None: no auth required
    error: tuple[int, Any] | None = None  # (status, detail) to answer instead of the manifest
    target_met: str | None = None
    honour_etag: bool = True
    redirect_to: str | None = None
    requests: list[dict[str, str]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, str]:
        return self.requests[-1]


def _handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            service.requests.append({key.lower(): value for key, value in self.headers.items()} | {"path": self.path})
            if service.redirect_to is not None:
                self._send(307, b"", Location=service.redirect_to + self.path)
            elif service.token is not None and self.headers.get("Authorization") != f"Bearer {service.token}":
                self._json(401, "missing or unknown token")
            elif service.error is not None:
                self._json(*service.error)
            elif service.honour_etag and self.headers.get("If-None-Match") == etag_of(service.body):
                self._send(304, b"", ETag=etag_of(service.body))
            else:
                self._send(200, service.body, ETag=etag_of(service.body))

        def _json(self, status: int, detail: Any) -> None:
            self._send(status, json.dumps({"detail": detail}).encode())

        def _send(self, status: int, body: bytes, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if service.target_met is not None and self.path.startswith("/v1/schedules/best/"):
                headers["X-Illava-Target-Met"] = service.target_met
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
            pass

    return Handler


def _serve(service: Service) -> Iterator[Service]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(service))
    service.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ILLAVA_TOKEN", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def service() -> Iterator[Service]:
    yield from _serve(Service())


@pytest.fixture
def other_service() -> Iterator[Service]:
    yield from _serve(Service())


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{BEST}"


def file_state(path: Path) -> tuple[bytes, int, int]:
    stat = path.stat()
    return path.read_bytes(), stat.st_ino, stat.st_mtime_ns


# --------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_a_path_is_read_and_validated(tmp_path: Path, suffix: str) -> None:
    manifest = manifest_for()
    path = tmp_path / f"manifest{suffix}"
    path.write_text(json.dumps(manifest) if suffix == ".json" else yaml.safe_dump(manifest))
    for source in (path, str(path)):
        fetched = fetch_manifest(source)
        assert fetched == Fetched(manifest, changed=False, etag=None, source=str(path))
    assert load_manifest(path) == manifest


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not a valid JSON document"),
        ("[1, 2]", "a manifest is a JSON object, got list"),
        ('{"backbone": {}}', "has no 'schedule'"),
        ('{"schedule": {"reduction": 1.5}}', "schedule is invalid: invalid schedule: reduction 1.5"),
        ('{"schedule": {"colour": 1}}', "unknown schedule field"),
    ],
)
def test_an_invalid_file_names_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=problem) as caught:
        load_manifest(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_and_an_unsupported_scheme_are_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="could not be read"):
        load_manifest(tmp_path / "absent.json")
    with pytest.raises(ManifestError, match="ftp://"):
        load_manifest("ftp://tuner/manifest")


# --------------------------------------------------------------------------------- URL, no cache
def test_a_url_without_cache_returns_the_answer(service: Service) -> None:
    fetched = fetch_manifest(service.url + BEST, token=TOKEN)
    assert fetched.manifest == json.loads(service.body)
    assert fetched.changed and not fetched.stale
    assert fetched.etag == etag_of(service.body) and fetched.source == service.url + BEST
    assert fetched.target_met is None
    assert "if-none-match" not in service.last and service.last["path"] == BEST
    # What a deployment hands to `illava.apply`: a manifest whose schedule reads back exactly.
    expected = Schedule.paper_default(0.778, encoder_depth=8, llm_depth=8)
    assert Schedule.from_dict(fetched.manifest["schedule"]) == expected
    assert Schedule.coerce(fetched.manifest) == expected


# --------------------------------------------------------------------------------- URL with cache
def test_the_cache_is_written_then_revalidated_then_replaced(service: Service, tmp_path: Path) -> None:
    url, cache = service.url + "/v1/schedules/12/manifest", tmp_path / "cache" / "schedule.json"
    first = fetch_manifest(url, token=TOKEN, cache=cache)
    assert first.changed and cache.read_bytes() == service.body
    assert "if-none-match" not in service.last

    before = file_state(cache)
    second = fetch_manifest(url, token=TOKEN, cache=cache)
    assert not second.changed and second.manifest == first.manifest and second.etag == first.etag
    assert service.last["if-none-match"] == '"' + hashlib.sha256(cache.read_bytes()).hexdigest() + '"'
    assert file_state(cache) == before  # a 304 leaves the file untouched

    service.body = body_of(manifest_for(0.5))
    third = fetch_manifest(url, token=TOKEN, cache=cache)
    assert third.changed and third.manifest["schedule"]["reduction"] == 0.5
    assert cache.read_bytes() == service.body
    assert service.last["if-none-match"] == etag_of(before[0])
    assert [path.name for path in cache.parent.iterdir()] == ["schedule.json"]  # no temporary file left


def test_a_locally_edited_cache_is_replaced(service: Service, tmp_path: Path) -> None:
    cache = tmp_path / "schedule.json"
    edited = body_of(manifest_for(0.5))
    cache.write_bytes(edited)
    fetched = fetch_manifest(service.url + BEST, token=TOKEN, cache=cache)
    assert service.last["if-none-match"] == etag_of(edited)
    assert fetched.changed and cache.read_bytes() == service.body


def test_an_identical_200_answer_does_not_rewrite_the_cache(service: Service, tmp_path: Path) -> None:
    cache = tmp_path / "schedule.json"
    cache.write_bytes(service.body)
    service.honour_etag = False
    before = file_state(cache)
    fetched = fetch_manifest(service.url + BEST, token=TOKEN, cache=cache)
    assert not fetched.changed and file_state(cache) == before


def test_a_cache_that_cannot_be_written_is_a_warning(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(source: object, target: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    cache = tmp_path / "schedule.json"
    with pytest.warns(ManifestWarning, match="could not be written") as caught:
        fetched = fetch_manifest(service.url + BEST, token=TOKEN, cache=cache)
    assert fetched.manifest == json.loads(service.body) and not fetched.changed
    assert caught[0].filename == __file__
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed


# --------------------------------------------------------------------------------- auth
def test_the_token_is_sent_as_bearer_from_the_argument_or_the_environment(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_manifest(service.url + BEST, token=TOKEN)
    assert service.last["authorization"] == f"Bearer {TOKEN}"
    monkeypatch.setenv("ILLAVA_TOKEN", TOKEN)
    load_manifest(service.url + BEST)
    assert service.last["authorization"] == f"Bearer {TOKEN}"
    service.token = None
    load_manifest(service.url + BEST, token="")  # an empty token means none, even over the environment
    assert "authorization" not in service.last


def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it(service: Service) -> None:
    with pytest.raises(ManifestError, match="cannot carry") as caught:
        load_manifest(service.url + BEST, token=TOKEN + "\nX-Evil: 1")
    assert TOKEN not in str(caught.value) and not service.requests


def test_a_redirect_to_another_origin_does_not_carry_the_token(service: Service, other_service: Service) -> None:
    other_service.token = None
    service.redirect_to = other_service.url  # a 307 to another port: another origin
    load_manifest(service.url + BEST, token=TOKEN)
    assert service.last["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in other_service.last and other_service.last["path"] == BEST


# --------------------------------------------------------------------------------- HTTP errors
@pytest.mark.parametrize(
    ("status", "detail", "shown"),
    [
        (401, "unknown token", "HTTP 401 .*unknown token.*pass token= or set ILLAVA_TOKEN"),
        (403, "scope 'read' cannot read schedules", "HTTP 403 .*scope 'read'.*this token's scope does not allow it"),
        (404, "no published schedule matches", "HTTP 404 .*no published schedule matches"),
        (
            422,
            [{"loc": ["query", "speedup"], "msg": "Input should be a valid number"}, {"msg": "second problem"}],
            "HTTP 422 .*query.speedup: Input should be a valid number; second problem",
        ),
        (503, f"database down (got {TOKEN})", "HTTP 503 .*database down"),
    ],
)
def test_an_error_answer_names_status_detail_and_url(
    service: Service, tmp_path: Path, status: int, detail: Any, shown: str
) -> None:
    cache = tmp_path / "schedule.json"
    service.error = (status, detail)
    with pytest.raises(ManifestError, match=shown) as caught:
        load_manifest(service.url + BEST, token=TOKEN, cache=cache)
    message = str(caught.value)
    assert service.url + BEST in message
    assert TOKEN not in message and TOKEN not in repr(caught.value.args)  # even when the server echoes it
    assert caught.value.__cause__ is None and not cache.exists()


def test_a_401_without_a_token_says_none_was_sent(service: Service) -> None:
    with pytest.raises(ManifestError, match="HTTP 401 .*no token was sent: pass token= or set ILLAVA_TOKEN"):
        load_manifest(service.url + BEST)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>502 Bad Gateway</html>", "not a valid JSON document"),
        (b'{"manifest_version": 1}', "has no 'schedule'"),
        (b'{"schedule": {"reduction": -0.1}}', "schedule is invalid"),
    ],
)
def test_an_invalid_answer_is_refused_and_the_cache_kept(
    service: Service, tmp_path: Path, body: bytes, problem: str
) -> None:
    cache = tmp_path / "schedule.json"
    fetch_manifest(service.url + BEST, token=TOKEN, cache=cache)
    before = file_state(cache)
    service.body = body
    with pytest.raises(ManifestError, match=problem) as caught:
        fetch_manifest(service.url + BEST, token=TOKEN, cache=cache)
    assert service.url + BEST in str(caught.value)
    assert file_state(cache) == before


# --------------------------------------------------------------------------------- service down
def test_an_unreachable_service_falls_back_on_the_cache(closed_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "schedule.json"
    cache.write_bytes(body_of(manifest_for()))
    with pytest.warns(ManifestWarning, match="unreachable") as caught:
        fetched = fetch_manifest(closed_url, token=TOKEN, cache=cache)
    assert fetched.stale and not fetched.changed and fetched.manifest == manifest_for()
    assert fetched.etag == etag_of(cache.read_bytes())
    message = str(caught[0].message)
    assert str(cache) in message and "illava r=0.778" in message and TOKEN not in message
    assert caught[0].filename == __file__  # the warning points at the caller
    with pytest.warns(ManifestWarning):
        assert load_manifest(closed_url, cache=cache) == manifest_for()


def test_an_unreachable_service_without_a_usable_cache_is_an_error(closed_url: str, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot reach .*no cached copy") as caught:
        load_manifest(closed_url, token=TOKEN, cache=tmp_path / "absent.json")
    assert TOKEN not in str(caught.value)
    with pytest.raises(ManifestError, match="cannot reach"):
        load_manifest(closed_url)
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing is used
        with pytest.raises(ManifestError, match="cached copy is unusable.*has no 'schedule'"):
            load_manifest(closed_url, cache=broken)


# --------------------------------------------------------------------------------- target met
@pytest.mark.parametrize(("header", "expected"), [("true", True), ("false", False), ("False", False), (None, None)])
def test_target_met_is_read_from_the_header(service: Service, tmp_path: Path, header: str | None, expected) -> None:
    service.target_met = header
    cache = tmp_path / "schedule.json"
    assert fetch_manifest(service.url + BEST, token=TOKEN, cache=cache).target_met is expected
    assert fetch_manifest(service.url + BEST, token=TOKEN, cache=cache).target_met is expected  # on the 304 too
    assert fetch_manifest(service.url + "/v1/schedules/12/manifest", token=TOKEN).target_met is None


# --------------------------------------------------------------------------------- dependencies
def test_importing_illava_imports_no_http_library() -> None:
    code = (
        "import sys, illava, illava.manifests\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'requests', 'httpx', 'fastapi', 'starlette', "
        "'urllib3', 'aiohttp'})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert illava.load_manifest is load_manifest
