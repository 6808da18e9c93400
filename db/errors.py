"""What `db` raises. Callers (CLI, API, the jobs driver) catch these, never SQLAlchemy's or a driver's."""

from __future__ import annotations

UPGRADE_HINT = "run `illava-tune db upgrade`"


class DatabaseError(RuntimeError):
    """The database could not do what was asked: no connection, a failed statement, a broken
    constraint. The message names the database (password masked) and what failed."""


class SchemaError(DatabaseError):
    """The database's schema is not the one this illava-tune was built for."""


class NotFound(LookupError):
    """No row with the id (or name) asked for. `kind` is what was looked up ("tuning job"), `key` the id."""

    def __init__(self, kind: str, key: object, detail: str = "") -> None:
        self.kind = kind
        self.key = key
        super().__init__(f"no {kind} {key!r}" + (f": {detail}" if detail else ""))


class AmbiguousId(NotFound):
    """An id prefix that more than one row starts with; `matches` lists (some of) them."""

    def __init__(self, kind: str, key: object, matches: list[str]) -> None:
        self.kind = kind
        self.key = key
        self.matches = matches
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        LookupError.__init__(self, f"{kind} id prefix {key!r} is ambiguous: it matches {shown}; give more characters")
