"""One Settings object read from the environment (COMPACTOR_*), behind a cached getter.

Embedded default: everything under ``data_dir`` — Celery's filesystem broker,
SQLite job store, artifact directory. Distributed: ``broker_url`` and
``store_url`` point at Redis and ``data_dir`` at storage every host mounts.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COMPACTOR_", extra="ignore")

    data_dir: Path = Path("./compactor-data")
    # None → the embedded default under data_dir (filesystem broker / SQLite).
    broker_url: str | None = None
    store_url: str | None = None
    # "tenant:key" pairs, comma-separated; or a file with one pair per line.
    api_keys: str = ""
    api_keys_file: Path | None = None

    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False

    max_upload_bytes: int = 2 * 1024**3
    # Gateway and workers check uploads against the same numbers (compactor/limits.py).
    max_parameters: int = Field(default=500_000_000, gt=0, description="tensor elements a model may hold")
    max_dataset_bytes: int = Field(default=4 * 1024**3, gt=0, description="uncompressed bytes a dataset may declare")
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 1.0
    max_attempts: int = 3
    job_soft_time_limit: float = Field(default=6 * 3600.0, description="seconds before a job is stopped with 'timeout'")
    job_hard_time_limit: float = 6 * 3600.0 + 300.0
    queue_name: str = "compactor"
    # Every job runs in a child process (worker/sandbox.py); an uploaded TorchScript archive is a
    # program, and its child must load it within this many seconds.
    torchscript_probe_seconds: float = Field(default=120.0, gt=0)
    # Uploaded TorchScript runs only in a kernel-confined child (worker/confinement.py). A worker
    # whose kernel cannot confine refuses such jobs with `confinement_unavailable`, unless the
    # operator sets this — only for hosts that run nobody else's models (e.g. a laptop, a CI box).
    allow_unconfined_torchscript: bool = False
    # Address space a job's child may map beyond the core it inherits (CPU jobs; CUDA maps huge
    # virtual ranges and is not limited this way). None: three quarters of the machine's memory.
    job_memory_bytes: int | None = Field(default=None, gt=0)
    # Largest file a job may write (its artifacts); None: twice max_upload_bytes, at least 1 GiB.
    job_file_bytes: int | None = Field(default=None, gt=0)
    # Torch threads per worker process; None = torch's default (all cores). `compactor serve`
    # leaves one core to the gateway so status polls stay fast while a job trains.
    torch_threads: int | None = Field(default=None, ge=1)
    # Niceness a worker process adds to its own CPU priority. Where workers share cores with the
    # gateway (`compactor serve` sets 10 unless told otherwise), training then takes what the
    # gateway leaves and status polls stay fast; on worker-only hosts leave it at 0.
    worker_nice: int = Field(default=0, ge=0, le=19)
    # uvicorn's per-request access log; off by default (dashboards poll every second).
    access_log: bool = False
    # "json": one JSON object per line with job_id, tenant and stage (for log pipelines).
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # When set, GET /metrics wants `Authorization: Bearer <token>` (it shows job counts of all tenants).
    metrics_token: str | None = None
    # How often an open /v1/jobs/{id}/events stream re-reads its job (the worker writes ≥ 1/s).
    events_poll_seconds: float = Field(default=0.5, gt=0, le=10)

    # Job-end webhooks (spec.notify.url; compactor/webhooks.py). The hosts they may reach:
    # names, "*.example.com" (any name under it), IPs, "[v6]", each optionally ":port";
    # comma-separated. Empty: webhooks are disabled and every notify URL is refused.
    webhook_allowed_hosts: str = ""
    # "tenant:secret" pairs (HMAC-SHA256 signing keys, at least 16 characters), comma-separated,
    # and/or a file with one pair per line (re-read on use, so a rotation needs no restart).
    # Open (keyless) mode's tenant is "default".
    webhook_secrets: str = ""
    webhook_secrets_file: Path | None = None
    # Attempts per job end; the delay doubles from webhook_backoff_seconds (capped at 300 s, jittered).
    webhook_max_attempts: int = Field(default=6, ge=1, le=50)
    webhook_backoff_seconds: float = Field(default=2.0, gt=0)
    # Per network operation (connect, send, first response bytes) of one attempt.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _valid_webhook_allowlist(cls, value: str) -> str:
        from compactor.webhooks import parse_allowlist  # lazy: only processes that use webhooks load httpx

        parse_allowlist(value)  # a typo must stop the process at start-up, not refuse every URL later
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _valid_webhook_secrets(cls, value: str) -> str:
        from compactor.webhooks import inline_secrets

        inline_secrets(value)
        return value

    @property
    def effective_job_memory_bytes(self) -> int:
        if self.job_memory_bytes is not None:
            return self.job_memory_bytes
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4)
        except (ValueError, OSError, AttributeError):
            return 16 * 1024**3

    @property
    def effective_job_file_bytes(self) -> int:
        return self.job_file_bytes or max(2 * self.max_upload_bytes, 1024**3)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def effective_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.resolved_data_dir / 'jobs.sqlite3'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
