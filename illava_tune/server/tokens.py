"""Tokens of the schedule service: made here, shown once, stored as a hash, checked in constant time.

A token reads `ilt_<key>_<secret>`: `key` (12 hex digits) is public and finds the row, `secret` is
32 random bytes (URL-safe base64). Only the sha256 of the secret is stored, so a copy of the
database lets no one call the service. Scopes: "read" (schedules, jobs, fronts) and "write"
(submit, cancel, resume, publish, retire; reads too). Nothing here imports the HTTP stack: the
`illava-tune token` commands use it without FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from db import Database, queries
from db.models import utcnow

PREFIX = "ilt"
#: A token's `last_used_at` is written at most this often (a read must not become a write each time).
TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class TokenInfo:
    """What is known of a token without its secret."""

    key: str
    name: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    def allows(self, scope: str) -> bool:
        """Whether this token may do what `scope` needs ("write" tokens may read)."""
        return self.revoked_at is None and (self.scope == "write" or scope == "read")


def _info(row) -> TokenInfo:
    return TokenInfo(row.key, row.name, row.scope, row.created_at, row.revoked_at, row.last_used_at)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(database: Database, *, scope: str, name: str | None = None) -> tuple[str, TokenInfo]:
    """A new token: (the token itself, to show once, and what is stored of it)."""
    key, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    with database.session() as s:
        row = queries.create_token(
            s, key=key, name=name or f"{scope}-{key}", scope=scope, secret_sha256=_digest(secret)
        )
        return f"{PREFIX}_{key}_{secret}", _info(row)


def list_all(database: Database) -> list[TokenInfo]:
    with database.session() as s:
        return [_info(row) for row in queries.list_tokens(s)]


def revoke(database: Database, key_or_name: str) -> TokenInfo:
    """Revoke a live token by its key or its (unique) name; the service refuses it from then on."""
    with database.session() as s:
        return _info(queries.revoke_token(s, key_or_name))


def verify(database: Database, presented: str) -> TokenInfo | None:
    """The live token `presented` is, or None (malformed, unknown, wrong secret, revoked). The
    secret's hash is compared in constant time; the row is found by the public key only."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    with database.session() as s:
        row = queries.find_token(s, parts[1])
        if row is None or not hmac.compare_digest(row.secret_sha256, _digest(parts[2])) or row.revoked_at:
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > TOUCH_EVERY:
            queries.touch_token(s, row.id, now)
        return _info(row)
