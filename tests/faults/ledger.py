"""What the workers actually did, read back from their logs, and the fault table's rows.

"Ran exactly once" is measured, not assumed. Every attempt a worker starts logs
``job <id>: attempt <n> claimed by <owner>`` (the runner, once the store granted the
lease), and every run of the task ends with Celery's ``Task compactor.run_job[<task>] ...``
line; an attempt whose process died has no end line, and ends when its process did
(the harness records that moment). From these intervals a job is **duplicated** when

* two of its attempts were alive at the same time (the lease failed to keep a second
  worker out: a broker redelivery, a reaper that re-queued a live attempt), or
* more than one attempt recorded an outcome (``job <id> succeeded with`` / ``failed:`` /
  ``cancelled`` / the hard-limit failure), or an attempt was claimed after one did.

The ledger is checked against the store: the number of claims seen in the logs must equal
the job's ``attempts`` (no graceful stops happen while a scenario runs), so a log line the
parser missed fails the test instead of hiding a duplicate. A job is **lost** when, after
the scenario's deadline, it is missing from the store or not in a terminal state.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from compactor.jobs import Job, JobStatus

_PREFIX = r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/(?P<pid>\d+)\] "
_JOB_ID = r"(?P<job>job_[A-Za-z0-9]+)"
_CLAIM = re.compile(_PREFIX + rf"worker\.runner: job {_JOB_ID}: attempt (?P<attempt>\d+) claimed by (?P<owner>\S+)")
# Celery's trace line that ends every run of the task ("received" is its start, not its end).
_TASK_END = re.compile(_PREFIX + r"celery\.app\.trace: Task compactor\.run_job\[(?P<task>[^\]]+)\] (?!received)(?P<rest>.*)")
_RETURN_VALUE = re.compile(r"succeeded in [\d.e-]+s: '(?P<outcome>\w+)'")
_OUTCOME_RECORDED = re.compile(
    _PREFIX + rf"worker\.(?:runner|lease): job {_JOB_ID}(?: succeeded with| failed: | cancelled| ran past its hard time limit)"
)
_REQUEUED = re.compile(_PREFIX + rf"worker\.reaper: job {_JOB_ID}: lease expired after attempt \d+; re-queued")
_NOT_CLAIMED = re.compile(_PREFIX + rf"worker\.runner: job {_JOB_ID} not claimed \((?P<why>[^)]*)\)")


def _moment(text: str) -> datetime:
    # Log times are the host's local time, as is datetime.now() in the harness.
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


@dataclass
class Attempt:
    job_id: str
    owner: str
    pid: int
    started: datetime
    ended: datetime | None = None  # None: its process is still alive and the attempt unfinished
    outcome: str | None = None  # the task's return value; None when its process died first

    @property
    def task_id(self) -> str:
        # The owner is "<node>/<pid>/<task id>/<random>" (worker/tasks.py).
        return self.owner.split("/")[2]


@dataclass
class Ledger:
    attempts: dict[str, list[Attempt]] = field(default_factory=lambda: defaultdict(list))
    recorded: dict[str, list[datetime]] = field(default_factory=lambda: defaultdict(list))
    requeued: dict[str, list[datetime]] = field(default_factory=lambda: defaultdict(list))
    not_claimed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def read(cls, logs: Iterable[tuple[Path, datetime | None]]) -> Ledger:
        """``logs``: each worker process's log file and when that process died (None: alive)."""
        ledger = cls()
        for path, died in logs:
            open_attempt: Attempt | None = None
            for line in path.read_text(errors="replace").splitlines():
                if claim := _CLAIM.match(line):
                    open_attempt = Attempt(claim["job"], claim["owner"], int(claim["pid"]), _moment(claim["ts"]))
                    ledger.attempts[open_attempt.job_id].append(open_attempt)
                elif (end := _TASK_END.match(line)) and open_attempt is not None and end["task"] == open_attempt.task_id:
                    # A solo worker runs one task at a time, so the next end line of this task is this attempt's.
                    open_attempt.ended = _moment(end["ts"])
                    returned = _RETURN_VALUE.search(end["rest"])
                    open_attempt.outcome = returned["outcome"] if returned else end["rest"][:80]
                    open_attempt = None
                elif recorded := _OUTCOME_RECORDED.match(line):
                    ledger.recorded[recorded["job"]].append(_moment(recorded["ts"]))
                elif requeued := _REQUEUED.match(line):
                    ledger.requeued[requeued["job"]].append(_moment(requeued["ts"]))
                elif skipped := _NOT_CLAIMED.match(line):
                    ledger.not_claimed[skipped["job"]].append(skipped["why"])
            if open_attempt is not None and died is not None:
                open_attempt.ended = died  # killed mid-attempt: it ran until its process died
        return ledger

    def duplicated(self, job_id: str) -> list[str]:
        """Why ``job_id`` counts as duplicated (empty: it did not)."""
        reasons: list[str] = []
        attempts = sorted(self.attempts.get(job_id, []), key=lambda attempt: attempt.started)
        for earlier, later in itertools.pairwise(attempts):
            if earlier.ended is None or later.started < earlier.ended:
                reasons.append(f"attempt by {later.owner} started while {earlier.owner} was still running")
        recorded = sorted(self.recorded.get(job_id, []))
        if len(recorded) > 1:
            reasons.append(f"{len(recorded)} attempts recorded an outcome")
        if recorded and any(attempt.started > recorded[0] for attempt in attempts):
            reasons.append("an attempt was claimed after the outcome was recorded")
        return reasons

    def check_against_store(self, jobs: Mapping[str, Job | None]) -> None:
        """Every attempt the store counted must appear in the logs, or the ledger is blind."""
        for job_id, job in jobs.items():
            if job is None:
                continue
            seen = len(self.attempts.get(job_id, []))
            assert seen == job.attempts, f"job {job_id}: the store counts {job.attempts} attempt(s), the logs show {seen}"


@dataclass
class FaultRow:
    scenario: str
    submitted: int
    succeeded: int
    failed_as_expected: int
    lost: int
    duplicated: int
    recovery_seconds: float | None
    notes: str = ""


COLUMNS = ("scenario", "jobs submitted", "succeeded", "failed as expected", "lost", "duplicated", "recovery s", "notes")


def render_table(rows: Iterable[FaultRow]) -> str:
    """A Markdown table, as it goes into the README."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row in rows:
        recovery = "—" if row.recovery_seconds is None else f"{row.recovery_seconds:.1f}"
        cells = (row.scenario, row.submitted, row.succeeded, row.failed_as_expected, row.lost, row.duplicated, recovery, row.notes)
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


# -- counting a scenario's jobs


def count_status(jobs: Mapping[str, Job | None], status: JobStatus) -> int:
    return sum(1 for job in jobs.values() if job is not None and job.status is status)


def count_lost(jobs: Mapping[str, Job | None]) -> int:
    """Jobs gone from the store or still not finished when the scenario's time was up."""
    return sum(1 for job in jobs.values() if job is None or not job.finished)


def count_duplicated(ledger: Ledger, jobs: Mapping[str, Job | None]) -> int:
    return sum(1 for job_id in jobs if ledger.duplicated(job_id))


def describe(ledger: Ledger, jobs: Mapping[str, Job | None]) -> str:
    """Each job's state and attempts, for an assertion message."""
    lines = []
    for job_id, job in jobs.items():
        state = "missing" if job is None else f"{job.status.value}, attempts {job.attempts}, error {job.error}"
        lines.append(f"{job_id}: {state}; duplicated: {ledger.duplicated(job_id) or 'no'}")
    return "\n".join(lines)
