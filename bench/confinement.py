"""What running a job in a child costs, confined or not (prints a table).

    make bench-confinement      # or: python -m bench.confinement [--runs 7]

One TorchScript upload (the digits TinyCNN, width 8) and one spec (dynamic INT8 + evaluation +
benchmark), run three ways on the same files, interleaved: the core called in this process
(``compress_files``, the old way), a child with resource limits only (what a state-dict job
gets), and a kernel-confined child (what a TorchScript job gets). For each: the child's start-up
(fork from the fork server → confined → its first message), the hand-off (result message →
child exited → artifacts adopted), the wall time of the whole call, the core's own stage
seconds from the report, and the overhead = wall − stages.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compactor.settings import Settings
from compactor.spec import parse_spec
from tests.support.jobs import QUICK_SPEC, write_digits_dataset, write_torchscript_model
from worker.compression.pipeline import compress_files
from worker.sandbox import ChildJob, ChildLimits, confinement_status, run_in_child, start_fork_server


def _stage_seconds(metrics: dict[str, Any]) -> float:
    return sum(stage["seconds"] for stage in metrics["stages"])


def _in_process(model: Path, dataset: Path, out_dir: Path) -> dict[str, float]:
    started = time.perf_counter()
    # Our own model, in this (unconfined) process: the comparison the child is measured against.
    result = compress_files(model, parse_spec(QUICK_SPEC), out_dir, dataset_path=dataset, trusted_code=True)
    wall = time.perf_counter() - started
    return {"start": 0.0, "hand_off": 0.0, "wall": wall, "stages": _stage_seconds(result.metrics)}


def _in_child(model: Path, dataset: Path, out_dir: Path, *, confined: bool, settings: Settings) -> dict[str, float]:
    job = ChildJob(
        model_path=model,
        dataset_path=dataset,
        out_dir=out_dir,
        spec=parse_spec(QUICK_SPEC).model_dump(mode="json"),
        confined=confined,
        limits=ChildLimits(
            address_space_bytes=settings.effective_job_memory_bytes,
            cpu_seconds=3600,
            file_bytes=settings.effective_job_file_bytes,
            load_seconds=120,
        ),
        threads=torch.get_num_threads(),
        # The unconfined way measures a state-dict job's child; the model is the same TorchScript
        # file for all three ways, so this one runs it as an operator's opt-out would.
        unconfined_code_allowed=not confined,
    )
    started = time.perf_counter()
    result = run_in_child(job, progress=lambda stage, fraction: None, should_stop=lambda: False)
    wall = time.perf_counter() - started
    return {"start": result.seconds_to_start, "hand_off": result.seconds_to_hand_off, "wall": wall, "stages": _stage_seconds(result.metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (torch.get_num_threads())))
    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="compactor-bench-confinement-") as root:
        base = Path(root)
        model = write_torchscript_model(base / "model.ts")
        dataset = write_digits_dataset(base / "digits.pt")
        start_fork_server()
        status = confinement_status(base / "data")
        if not status.available:
            raise SystemExit(f"confinement is unavailable here: {status.reason}")
        ways = {
            "in this process (before)": lambda out: _in_process(model, dataset, out),
            "child, limits only (state-dict jobs)": lambda out: _in_child(model, dataset, out, confined=False, settings=settings),
            "child, confined (TorchScript jobs)": lambda out: _in_child(model, dataset, out, confined=True, settings=settings),
        }
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
        for run in range(args.runs + 1):
            for name, way in ways.items():
                out = base / f"out-{run}-{len(samples[name])}-{abs(hash(name))}"
                out.mkdir()
                figures = way(out)
                if run > 0:  # the first round warms the caches of all three
                    samples[name].append(figures)

    def median(name: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[name])

    print(f"\nJob in a child: {args.runs} runs each, interleaved, median seconds (torch threads {torch.get_num_threads()})\n")
    print("| way | child start | hand-off | wall | core's stages | overhead (wall − stages) |")
    print("|---|---|---|---|---|---|")
    for name in ways:
        overhead = statistics.median(sample["wall"] - sample["stages"] for sample in samples[name])
        print(
            f"| {name} | {median(name, 'start'):.3f} | {median(name, 'hand_off'):.3f} | {median(name, 'wall'):.3f} "
            f"| {median(name, 'stages'):.3f} | {overhead:.3f} |"
        )
    confined = median("child, confined (TorchScript jobs)", "wall")
    unconfined = median("child, limits only (state-dict jobs)", "wall")
    before = median("in this process (before)", "wall")
    print(
        f"\nPer job, against the core in this process: confined {confined - before:+.3f} s, limits only {unconfined - before:+.3f} s (target ≤ 0.5 s)"
    )


if __name__ == "__main__":
    main()
