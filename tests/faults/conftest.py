"""The fault suite's fixtures and its table.

Every scenario records one row (``record_row``); at the end of the run the rows are
printed as a table and written to ``.pytest_cache/faults.md`` (or to the path in
``COMPACTOR_FAULTS_TABLE``). Each scenario asserts lost == 0 and duplicated == 0 after
recording its row, so a failing scenario still shows its numbers.

Redis: the shared server on 127.0.0.1:6379, databases 10 (broker) and 11 (job store)
only, flushed before and after each scenario. The Redis-outage scenario starts its own
``redis-server`` instead. Skipped when no Redis answers, failed instead when
COMPACTOR_REQUIRE_REDIS=1 (as in the rest of the suite).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.faults.cluster import Cluster, ClusterFactory, flush_databases
from tests.faults.ledger import FaultRow, render_table
from tests.support.jobs import redis_or_skip, write_digits_dataset, write_torchscript_model

BROKER_URL = "redis://127.0.0.1:6379/10"
STORE_URL = "redis://127.0.0.1:6379/11"

_ROWS: list[FaultRow] = []


@pytest.fixture(scope="session")
def shared_redis() -> tuple[str, str]:
    """(broker URL, store URL) on the shared Redis, or a skip when it does not answer."""
    redis_or_skip(BROKER_URL).close()
    return BROKER_URL, STORE_URL


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-inputs")
    return {"model": write_torchscript_model(root / "tiny.ts"), "dataset": write_digits_dataset(root / "digits.pt")}


@pytest.fixture()
def make_cluster(tmp_path: Path, shared_redis: tuple[str, str]) -> Iterator[ClusterFactory]:
    """Build a Cluster (on the shared Redis unless told otherwise); all are closed afterwards."""
    made: list[Cluster] = []
    flushed: set[tuple[str, ...]] = set()

    def make(*, broker_url: str | None = None, store_url: str | None = None, **options: object) -> Cluster:
        urls = (broker_url or shared_redis[0], store_url or shared_redis[1])
        flush_databases(urls)
        flushed.add(urls)
        cluster = Cluster(tmp_path / f"cluster-{len(made) + 1}", urls[0], urls[1], **options)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
    for urls in flushed:
        with contextlib.suppress(redis.RedisError):  # a scenario's own server may be gone already
            flush_databases(urls)


@pytest.fixture()
def record_row() -> Callable[[FaultRow], None]:
    def record(row: FaultRow) -> None:
        _ROWS.append(row)
        assert row.lost == 0, f"{row.scenario}: {row.lost} job(s) lost"
        assert row.duplicated == 0, f"{row.scenario}: {row.duplicated} job(s) ran twice"

    return record


def table_path(config: pytest.Config) -> Path:
    configured = os.environ.get("COMPACTOR_FAULTS_TABLE")
    return Path(configured) if configured else config.rootpath / ".pytest_cache" / "faults.md"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if not _ROWS:
        return
    table = render_table(_ROWS)
    terminalreporter.write_sep("=", "fault scenarios")
    terminalreporter.write_line(table)
    path = table_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")
    except OSError as exc:
        terminalreporter.write_line(f"(could not write {path}: {exc})")
    else:
        terminalreporter.write_line(f"(written to {path})")
