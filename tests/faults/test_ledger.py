"""The ledger that counts duplicated runs must see a duplicate when there is one."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from tests.faults.ledger import FaultRow, Ledger, render_table

pytestmark = pytest.mark.faults

JOB = "job_A1b2C3"


def claim(at: str, pid: int, task: str, node: str = "w1@h") -> str:
    return f"[2026-01-01 00:00:{at}: INFO/{pid}] worker.runner: job {JOB}: attempt 1 claimed by {node}/{pid}/{task}/abcd"


def task_end(at: str, pid: int, task: str, outcome: str) -> str:
    return f"[2026-01-01 00:00:{at}: INFO/{pid}] celery.app.trace: Task compactor.run_job[{task}] succeeded in 1.5s: '{outcome}'"


def succeeded(at: str, pid: int) -> str:
    return f"[2026-01-01 00:00:{at}: INFO/{pid}] worker.runner: job {JOB} succeeded with 3 artifact(s) [job_id={JOB} stage=x]"


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_overlapping_attempts_are_a_duplicate(tmp_path: Path) -> None:
    # A redelivery ran the job on a second worker while the first still ran it.
    first = write(tmp_path / "a.log", claim("01,000", 10, f"{JOB}-1"), succeeded("05,000", 10), task_end("05,001", 10, f"{JOB}-1", "finished"))
    second = write(tmp_path / "b.log", claim("03,000", 20, f"{JOB}-1", "w2@h"), task_end("06,000", 20, f"{JOB}-1", "lost"))
    ledger = Ledger.read([(first, None), (second, None)])
    assert [attempt.outcome for attempt in ledger.attempts[JOB]] == ["finished", "lost"]
    assert ledger.duplicated(JOB) == [f"attempt by w2@h/20/{JOB}-1/abcd started while w1@h/10/{JOB}-1/abcd was still running"]


def test_a_second_recorded_outcome_and_a_claim_after_it_are_a_duplicate(tmp_path: Path) -> None:
    log = write(
        tmp_path / "a.log",
        claim("01,000", 10, f"{JOB}-1"),
        succeeded("02,000", 10),
        task_end("02,001", 10, f"{JOB}-1", "finished"),
        claim("03,000", 10, f"{JOB}-2"),
        succeeded("04,000", 10),
        task_end("04,001", 10, f"{JOB}-2", "finished"),
    )
    reasons = Ledger.read([(log, None)]).duplicated(JOB)
    assert reasons == ["2 attempts recorded an outcome", "an attempt was claimed after the outcome was recorded"]


def test_a_killed_attempt_then_a_takeover_is_not_a_duplicate(tmp_path: Path) -> None:
    # The first worker was SIGKILLed at :02 (no end line); the reaper's takeover came after.
    killed = write(tmp_path / "a.log", claim("01,000", 10, f"{JOB}-1"))
    survivor = write(
        tmp_path / "b.log", claim("06,000", 20, f"{JOB}-2", "w2@h"), succeeded("07,000", 20), task_end("07,001", 20, f"{JOB}-2", "finished")
    )
    ledger = Ledger.read([(killed, datetime(2026, 1, 1, 0, 0, 2)), (survivor, None)])
    assert ledger.duplicated(JOB) == []
    # Had the takeover started before the kill, it would be one.
    early = write(tmp_path / "c.log", claim("01,500", 20, f"{JOB}-2", "w2@h"))
    assert Ledger.read([(killed, datetime(2026, 1, 1, 0, 0, 2)), (early, None)]).duplicated(JOB) != []


def test_the_table_renders_missing_recovery_as_a_dash() -> None:
    table = render_table([FaultRow("a", 1, 1, 0, 0, 0, None), FaultRow("b", 2, 1, 1, 0, 0, 3.14159, "note")])
    assert table.splitlines()[2] == "| a | 1 | 1 | 0 | 0 | 0 | — |  |"
    assert table.splitlines()[3] == "| b | 2 | 1 | 1 | 0 | 0 | 3.1 | note |"
