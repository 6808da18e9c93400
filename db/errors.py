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


class Conflict(ValueError):
    """The action conflicts with the row's state (cancel a finished job, publish a failed trial,
    retire a candidate): the message says what the state is and what is possible."""


class LeaseLost(DatabaseError):
    """A driver's lease on its job is gone (another driver took the job, or it was released): the
    driver must stop before it writes anything more for the job."""


class LeaseHeld(RuntimeError):
    """The job is owned by another driver whose lease is live (or, without force, not provably
    dead). `owner` is that driver ("host:pid:token"), `expires_at` when its lease runs out."""

    def __init__(self, message: str, owner: str, expires_at: object) -> None:
        self.owner = owner
        self.expires_at = expires_at
        super().__init__(message)


class BudgetExhausted(DatabaseError):
    """The job already has as many trials as its budget: no further trial may start."""
