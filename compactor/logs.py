"""Logging for the gateway and the workers: text for a terminal, JSON lines for log pipelines.

``COMPACTOR_LOG_FORMAT=json`` writes one JSON object per line with ``ts``, ``level``,
``logger``, ``message``, ``pid`` and, while a worker runs a job, ``job_id``,
``tenant`` and ``stage`` — on every line of that job, whichever thread or library
logged it (the core, the heartbeat thread, Celery, torch warnings routed to logging).

A worker process runs one job at a time (solo pool, or one prefork child per job),
so the job context is process-wide rather than a contextvar: the heartbeat thread
and the thread that runs the core must both carry it.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(process)d] %(name)s: %(message)s%(job_suffix)s"
JOB_FIELDS = ("job_id", "tenant", "stage")


class JobLogContext:
    """The job this process is running, if any (set by the worker's runner)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fields: dict[str, str] = {}

    def fields(self) -> dict[str, str]:
        with self._lock:
            return dict(self._fields)

    @contextmanager
    def job(self, job_id: str, tenant: str) -> Iterator[None]:
        with self._lock:
            self._fields = {"job_id": job_id, "tenant": tenant}
        try:
            yield
        finally:
            with self._lock:
                self._fields = {}

    def set_stage(self, stage: str) -> None:
        with self._lock:
            if self._fields and self._fields.get("stage") != stage:
                self._fields["stage"] = stage


job_context = JobLogContext()


class JobContextFilter(logging.Filter):
    """Puts the running job's fields on every record (attached to handlers, so all loggers get them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = job_context.fields()
        for name in JOB_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        record.job_suffix = " [" + " ".join(f"{k}={fields[k]}" for k in JOB_FIELDS if k in fields) + "]" if fields else ""
        return True


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(log_format: str = "text", level: str = "INFO") -> None:
    """One handler on the root logger in ``log_format`` (``text`` or ``json``); idempotent."""
    root = logging.getLogger()
    if any(getattr(handler, "_compactor", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._compactor = True  # type: ignore[attr-defined]
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
