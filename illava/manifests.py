"""Loading a schedule manifest at deployment start-up: from a file, or from the illava-tune
schedule service over HTTP with the last good answer kept in a cache file.

Standard library only (``urllib.request``): a deployment imports `illava` without any HTTP package.

The service's contract, which this client relies on:

* a manifest answer is ``200`` with the JSON body and ``ETag: "<sha256 hex of the body bytes>"``;
  a request with ``If-None-Match`` equal to that ETag gets ``304 Not Modified`` while the answer is
  unchanged. Because the cache file holds the body bytes exactly, its own sha256 *is* the ETag to
  send: no sidecar file, and a cache file edited by hand simply no longer matches and is replaced;
* the token travels as ``Authorization: Bearer <token>`` (never to another origin after a redirect);
* errors are ``{"detail": str | [{"loc": [...], "msg": str}, ...]}`` with 401, 403, 404, 422 or 503;
* the best-manifest route adds ``X-Illava-Target-Met: true|false``.

A manifest is accepted only when it is a JSON object whose ``schedule`` `Schedule.from_dict` reads,
and the cache file is replaced only by an accepted answer, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ManifestError, ManifestWarning
from .schedule import Schedule

TOKEN_ENV = "ILLAVA_TOKEN"
_URL_SCHEMES = ("http", "https")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what a header value carries unchanged
_DETAIL_LIMIT = 500  # characters of a server's error text quoted in a message
#: stacklevel of a warning raised in a helper of `_fetch_url`: helper, _fetch_url, _fetch, public function, caller.
_WARN_LEVEL = 5
_HINTS = {
    401: "pass token= or set ILLAVA_TOKEN",
    403: "this token's scope does not allow it",
}


@dataclass(frozen=True)
class Fetched:
    """What `fetch_manifest` got. `changed`: the cache file was written with new content (always
    True for a URL fetched without a cache, never for a path). `etag`: the strong ETag of the
    manifest's bytes (``'"<sha256 hex>"'``, what the service sends), None for a path. `source`: the
    path or URL, without credentials. `stale`: the service was unreachable and the cached copy was
    used. `target_met`: the service's ``X-Illava-Target-Met`` header, None when it sent none."""

    manifest: dict[str, Any]
    changed: bool
    etag: str | None
    source: str
    stale: bool = False
    target_met: bool | None = None


def load_manifest(
    source: str | os.PathLike[str],
    *,
    token: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """The manifest at `source` (a JSON/YAML file, or an ``http(s)://`` URL of the schedule service),
    validated; `fetch_manifest` says how the token, the cache and an unreachable service are handled.

    The deployment use, at start-up (works offline from the cache while the service is down)::

        illava.apply(model, illava.load_manifest(
            "http://tuner:8000/v1/schedules/best/manifest?backbone=qwen2.5-vl-7b&speedup=1.2",
            token=os.environ["TUNER_TOKEN"],
            cache="/var/cache/illava/schedule.json",
        ))
    """
    return _fetch(source, token, cache, timeout_s).manifest


def fetch_manifest(
    source: str | os.PathLike[str],
    *,
    token: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    timeout_s: float = 10.0,
) -> Fetched:
    """Load the manifest at `source` and say where it came from.

    A path is read as JSON (``.yaml``/``.yml`` as YAML). A URL is fetched with the bearer `token`
    (default: the ``ILLAVA_TOKEN`` environment variable). With a `cache` file, its sha256 is sent as
    ``If-None-Match``: a 304 answer returns the cached manifest, a 200 answer is validated and then
    written to the cache (atomically, only when its bytes differ). When the service cannot be reached,
    a valid cache file is returned with ``stale=True`` and a `ManifestWarning`.

    Raises `ManifestError` for an unreadable or invalid document, an HTTP error answer (its status,
    detail and the URL), or an unreachable service without a usable cache. No message holds the token.
    """
    return _fetch(source, token, cache, timeout_s)


def _fetch(source: Any, token: str | None, cache: Any, timeout_s: float) -> Fetched:
    # The same depth under both public functions, so that a warning raised two calls below
    # (`_WARN_LEVEL`) points at their caller.
    if isinstance(source, str) and _SCHEME.match(source):
        scheme = urlsplit(source).scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise ManifestError(f"cannot load a manifest from a {scheme}:// URL; give a path or an http(s):// URL")
        return _fetch_url(source, _bearer(token), None if cache is None else Path(cache), timeout_s)
    return _read_path(Path(source))


# --------------------------------------------------------------------------------- documents
def _read_path(path: Path) -> Fetched:
    """A manifest file, read and validated."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ManifestError(f"manifest file {str(path)!r} could not be read: {error.strerror or error}") from None
    manifest = _parse(data, str(path), as_yaml=path.suffix.lower() in (".yaml", ".yml"))
    return Fetched(manifest, changed=False, etag=None, source=str(path))


def _parse(data: bytes, source: str, *, as_yaml: bool = False) -> dict[str, Any]:
    """The manifest `data` holds; a `ManifestError` naming `source` when it is not a valid one."""
    try:
        document = _load_yaml(data) if as_yaml else json.loads(data)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, YAML errors (re-raised as one)
        raise ManifestError(f"{source}: not a valid {'YAML' if as_yaml else 'JSON'} document: {error}") from None
    return _validated(document, source)


def _load_yaml(data: bytes) -> Any:
    try:
        import yaml  # lazily: only YAML files need it
    except ImportError:
        raise ManifestError("reading a YAML manifest needs pyyaml (pip install pyyaml)") from None
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as error:
        raise ValueError(str(error)) from None


def _validated(document: Any, source: str) -> dict[str, Any]:
    """`document` when it is a manifest: a JSON object whose ``schedule`` `Schedule.from_dict` reads."""
    if not isinstance(document, dict):
        raise ManifestError(f"{source}: a manifest is a JSON object, got {type(document).__name__}")
    if "schedule" not in document:
        keys = sorted(str(key) for key in document)
        raise ManifestError(f"{source}: the manifest has no 'schedule' (its keys: {keys})")
    try:
        Schedule.from_dict(document["schedule"])
    except (ValueError, TypeError) as error:  # ScheduleError, or a value the dataclass rejects
        raise ManifestError(f"{source}: the manifest's schedule is invalid: {error}") from None
    return document


def _etag(data: bytes) -> str:
    """The strong ETag the service sends for a body: its quoted sha256."""
    return '"' + hashlib.sha256(data).hexdigest() + '"'


# --------------------------------------------------------------------------------- HTTP
def _fetch_url(url: str, token: str | None, cache: Path | None, timeout_s: float) -> Fetched:
    """GET `url`, revalidating against the cache file; the cache is written only with a valid answer."""
    shown = _shown(url)
    cached = _read_cache(cache)
    request = _request(url, token, None if cached is None else _etag(cached))
    try:
        with _opener().open(request, timeout=timeout_s) as response:
            body, headers = response.read(), response.headers
    except urllib.error.HTTPError as error:
        if error.code == 304 and cache is not None and cached is not None:
            return _not_modified(error, cache, cached, shown)
        raise _http_error(error, shown, token) from None
    except http.client.InvalidURL as error:
        raise ManifestError(f"{shown} is not a valid URL: {error}") from None
    except (OSError, http.client.HTTPException) as error:  # URLError, refused, timeout, cut off
        return _stale_copy(cache, shown, error)
    manifest = _parse(body, shown)
    changed = cached != body and _write_cache(cache, body)
    return Fetched(manifest, changed=changed, etag=_etag(body), source=shown, target_met=_target_met(headers))


def _not_modified(answer: urllib.error.HTTPError, cache: Path, cached: bytes, shown: str) -> Fetched:
    """The cached manifest, which a 304 answer said is still the service's."""
    target_met = _target_met(answer.headers)
    answer.close()
    return Fetched(_parse(cached, str(cache)), changed=False, etag=_etag(cached), source=shown, target_met=target_met)


def _bearer(token: str | None) -> str | None:
    """The token to send (`token`, else ``ILLAVA_TOKEN``; empty means none), checked to fit a header."""
    token = os.environ.get(TOKEN_ENV) if token is None else token
    if not token:
        return None
    if not _TOKEN_CHARS.match(token):
        # http.client would put the header value, token included, into its exception.
        raise ManifestError("the token holds characters an HTTP header cannot carry (whitespace or non-ASCII)")
    return token


def _request(url: str, token: str | None, etag: str | None) -> urllib.request.Request:
    headers = {"Accept": "application/json", "User-Agent": "illava-load-manifest"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if etag is not None:
        headers["If-None-Match"] = etag
    return urllib.request.Request(url, headers=headers, method="GET")


def _opener() -> urllib.request.OpenerDirector:
    # Built per call: urllib reads the proxy settings from the environment when the opener is built.
    return urllib.request.build_opener(_SameOriginRedirects)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib's own handler, but sends the token only to the origin it was
    given for (urllib's handler would forward ``Authorization`` to whatever host a redirect names)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def _shown(url: str) -> str:
    """`url` without the ``user:password@`` part, for messages and `Fetched.source`."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _target_met(headers: Any) -> bool | None:
    value = (headers.get("X-Illava-Target-Met") or "").strip().lower() if headers is not None else ""
    return {"true": True, "false": False}.get(value)


def _http_error(error: urllib.error.HTTPError, shown: str, token: str | None) -> ManifestError:
    """The status, the service's detail, a hint for 401/403 and the URL, in one message."""
    try:
        body = error.read()
    except (OSError, http.client.HTTPException):
        body = b""
    finally:
        error.close()
    detail = _detail(body) or str(error.reason)
    if token:  # the service is not meant to echo it; make sure no message does
        detail = detail.replace(token, "<token>")
    hint = _HINTS.get(error.code)
    if error.code == 401:
        hint = ("the token sent was not accepted: " if token else "no token was sent: ") + str(hint)
    message = f"HTTP {error.code} from {shown}: {detail}"
    return ManifestError(f"{message} ({hint})" if hint else message)


def _detail(body: bytes) -> str:
    """The service's ``detail`` (a string, or a list of ``{loc, msg}`` joined), else the body's text."""
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, TypeError, KeyError):
        return body.decode("utf-8", "replace").strip()[:_DETAIL_LIMIT]
    if isinstance(detail, list):
        detail = "; ".join(_detail_item(item) for item in detail)
    return str(detail)[:_DETAIL_LIMIT]


def _detail_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = ".".join(str(part) for part in item.get("loc") or ())
    msg = str(item.get("msg", item))
    return f"{loc}: {msg}" if loc else msg


# --------------------------------------------------------------------------------- cache
def _read_cache(cache: Path | None) -> bytes | None:
    """The cache file's bytes; None when there is no cache or no file yet."""
    if cache is None:
        return None
    try:
        return cache.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ManifestError(f"cache file {str(cache)!r} could not be read: {error.strerror or error}") from None


def _write_cache(cache: Path | None, data: bytes) -> bool:
    """Replace the cache file with `data` atomically (a temporary file in its directory, then
    ``os.replace``); True when a file now holds it, or when there is no cache to write (the answer
    is new to the caller). A file that cannot be written is a `ManifestWarning`, not an error: the
    manifest itself was fetched."""
    if cache is None:
        return True
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, cache)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as error:
        warnings.warn(
            f"cache file {str(cache)!r} could not be written: {error}", ManifestWarning, stacklevel=_WARN_LEVEL
        )
        return False
    return True


def _stale_copy(cache: Path | None, shown: str, error: BaseException) -> Fetched:
    """The cached manifest marked stale, when the service could not be reached; else a `ManifestError`."""
    reason = _reason(error)
    cached = _read_cache(cache)
    if cache is None or cached is None:
        raise ManifestError(f"cannot reach {shown}: {reason} (and no cached copy to fall back on)")
    try:
        manifest = _parse(cached, str(cache))
    except ManifestError as bad:
        raise ManifestError(f"cannot reach {shown}: {reason}; the cached copy is unusable: {bad}") from None
    schedule = Schedule.from_dict(manifest["schedule"]).describe()
    warnings.warn(
        f"the schedule service at {shown} is unreachable ({reason}); using the cached copy {str(cache)!r} "
        f"(schedule: {schedule})",
        ManifestWarning,
        stacklevel=_WARN_LEVEL,
    )
    return Fetched(manifest, changed=False, etag=_etag(cached), source=shown, stale=True)


def _reason(error: BaseException) -> str:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return str(reason) or type(reason).__name__
