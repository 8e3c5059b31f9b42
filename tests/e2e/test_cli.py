"""The ``compactor`` command's own rules, as a user meets them (real subprocesses, no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.jobs import REPO_ROOT, Proc, child_env, free_port


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_the_topologies(tmp_path: Path) -> None:
    result = run_cli("--help", env=child_env(tmp_path))
    assert result.returncode == 0
    for command in ("serve", "gateway", "worker"):
        assert command in result.stdout


def test_open_mode_refuses_a_public_address_without_insecure(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for command in ("serve", "gateway"):
        result = run_cli(command, "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(data_dir), env=child_env(data_dir))
        assert result.returncode == 2, result.stderr
        assert "no API keys are configured" in result.stderr and "--insecure" in result.stderr
    assert not (data_dir / "jobs.sqlite3").exists(), "a refused serve must not have started anything"


def test_gpu_worker_pins_its_device_before_torch_loads(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    refused = run_cli("worker", "--gpu", "1", "--concurrency", "2", env=child_env(data_dir))
    assert refused.returncode == 2 and "one job at a time" in refused.stderr

    worker = Proc(
        [sys.executable, "-m", "launcher.cli", "worker", "--gpu", "3", "--name", "gpu3@%h"],
        child_env(data_dir, CUDA_VISIBLE_DEVICES="0,1,2,3"),
        tmp_path / "worker.log",
    )
    try:
        # Logged at worker_init, before the pool (and with it torch) is loaded.
        worker.wait_log("device cuda, CUDA_VISIBLE_DEVICES=3, torch loaded: False", timeout=30)
    finally:
        # It may still be loading torch, before Celery's signal handlers exist: no clean stop to check.
        worker.kill()


def test_children_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """SIGKILL leaves a supervisor no chance to stop its children: the kernel must do it."""
    import os
    import signal

    from tests.support.jobs import pid_alive, wait_for

    port = free_port()
    # A stand-in supervisor: starts a gateway the way `compactor serve` does, then is killed.
    parent_script = (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, COMPACTOR_SUPERVISOR_PID=str(os.getpid()))\n"
        f"child = subprocess.Popen([sys.executable, '-m', 'launcher.cli', 'gateway', '--port', '{port}'], env=env)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script],
        cwd=REPO_ROOT,
        env=child_env(tmp_path / "data"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    gateway_pid = int(parent.stdout.readline())
    try:
        import httpx

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, 30, "the gateway to answer")
        parent.kill()
        parent.wait()
        wait_for(lambda: not pid_alive(gateway_pid), 15, f"gateway pid {gateway_pid} to stop after its parent died")
    finally:
        parent.kill()
        if pid_alive(gateway_pid):
            os.kill(gateway_pid, signal.SIGKILL)


def test_cli_and_worker_modules_do_not_load_torch(tmp_path: Path) -> None:
    """The CLI, the supervisor and a prefork parent must not load torch (CUDA) before forking."""
    script = (
        "import sys\n"
        "import launcher.cli, launcher.processes, worker.celery_app, worker.tasks, worker.runner\n"
        "launcher.cli.build_parser()\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'worker.compression.pipeline') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=child_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
