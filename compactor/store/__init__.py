"""Job stores: where jobs and upload records live, shared by the gateway and the worker.

    open_store("sqlite:////abs/path/jobs.sqlite3")  embedded default (one host); four slashes = absolute
    open_store("sqlite:///relative/jobs.sqlite3")   relative to the working directory (as in SQLAlchemy)
    open_store("redis://host:6379/0")               distributed (also rediss:// and unix://)

Errors: ``StoreUnavailable`` (cannot reach the database → 503), ``InvalidCursor``
(a list cursor this store did not hand out → 422), ``IllegalTransition`` (a
status change the state machine refuses), ``ValueError`` (a caller bug such as a
non-positive lease).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from compactor.jobs import IllegalTransition
from compactor.store.base import InvalidCursor, JobStore, StoreUnavailable

__all__ = ["IllegalTransition", "InvalidCursor", "JobStore", "StoreUnavailable", "open_store"]

_SQLITE_PREFIX = "sqlite:///"


def open_store(url: str) -> JobStore:
    """The job store named by ``url``; the backend's client library is imported only when used."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        if not url.startswith(_SQLITE_PREFIX) or len(url) == len(_SQLITE_PREFIX):
            raise ValueError(f"an SQLite store URL looks like sqlite:///path/to/jobs.sqlite3, not {url!r}")
        from compactor.store.sqlite import SQLiteJobStore

        return SQLiteJobStore(url[len(_SQLITE_PREFIX) :])
    if scheme in {"redis", "rediss", "unix"}:
        from compactor.store.redis import RedisJobStore

        return RedisJobStore(url)
    raise ValueError(f"unknown job store URL scheme {scheme!r}: use sqlite:///path or redis://host:port/db")
