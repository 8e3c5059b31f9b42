"""The client commands (compactor.client_cli) against a real gateway: output and exit codes."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from compactor.client_cli import ProgressLine, TransferProgress, main, metrics_summary
from compactor.jobs import Stage
from tests.support.gateway import ALICE
from tests.support.jobs import free_port
from tests.support.live_server import METRICS, Inputs, Server, drive_to_success


def run(capsys: pytest.CaptureFixture[str], server: Server | None, *argv: str, key: str = ALICE) -> tuple[int, str, str]:
    options = [] if server is None else ["--url", server.url, "--api-key", key]
    code = main([*argv, *options])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_submit_prints_the_job_id(capsys, server: Server, inputs: Inputs) -> None:
    code, out, err = run(
        capsys,
        server,
        "submit",
        str(inputs.model),
        "--dataset",
        str(inputs.dataset),
        "--spec",
        '{"quantize": {"mode": "dynamic"}}',
        "--idempotency-key",
        "cli-1",
    )
    assert code == 0
    job_id = out.strip()
    job = server.store.get_job(job_id)
    assert job is not None and job.dataset_id is not None and job.spec["quantize"]["mode"] == "dynamic"
    total = inputs.model.stat().st_size + inputs.dataset.stat().st_size
    assert f"upload: 100% of {total / 1e3:.1f} kB" in err  # stderr is not a TTY: plain lines
    code, again, _ = run(capsys, server, "submit", str(inputs.model), "--idempotency-key", "cli-1", "--json")
    assert code == 0 and json.loads(again)["id"] == job_id


def test_submit_wait_out_success_summary_and_artifacts(capsys, server: Server, inputs: Inputs, tmp_path: Path) -> None:
    def worker() -> None:
        job_id = server.queued_job_id()
        server.claim(job_id)
        server.progress(job_id, Stage.prune, 0.5)
        server.succeed(job_id, tmp_path)

    thread = threading.Thread(target=worker)
    thread.start()
    out_dir = tmp_path / "artifacts"
    code, out, err = run(capsys, server, "submit", str(inputs.model), "--wait", "--poll-interval", "0.02", "--out", str(out_dir))
    thread.join()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("job_") and "status:     succeeded" in lines
    assert "accuracy:   top-1 90.00% → 88.50% (-1.50 pt)" in out
    assert "size:       2.0 MB → 500.0 kB (ratio 0.25)" in out
    assert "MACs:       ratio 0.5" in out
    assert "speedup:    batch 1 1.5×, batch 32 2.25×" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.ts", "report.json"]
    assert f"saved:      {out_dir / 'model.ts'}" in out
    assert "100%" in err and "succeeded" in err  # the job's progress lines


def test_submit_wait_exits_1_when_the_job_fails(capsys, server: Server, inputs: Inputs) -> None:
    def worker() -> None:
        job_id = server.queued_job_id()
        server.claim(job_id)
        server.fail(job_id)

    thread = threading.Thread(target=worker)
    thread.start()
    code, out, err = run(capsys, server, "submit", str(inputs.model), "--wait", "--poll-interval", "0.02", "--json", "-q")
    thread.join()
    assert code == 1
    job = json.loads(out)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_model" and err == ""


def test_status_human_and_json(capsys, server: Server, inputs: Inputs, tmp_path: Path) -> None:
    with server.client() as client:
        job_id = client.submit(inputs.model)["id"]
    code, out, _ = run(capsys, server, "status", job_id)
    assert code == 0 and f"id:         {job_id}" in out and "status:     queued" in out and "progress:   0%" in out
    drive_to_success(server, job_id, tmp_path)
    code, out, _ = run(capsys, server, "status", job_id)
    assert code == 0 and "status:     succeeded" in out and "speedup:" in out and "artifact:   model.ts" in out
    code, out, _ = run(capsys, server, "status", job_id, "--json")
    assert code == 0 and json.loads(out)["metrics"] == METRICS
    with server.client() as client:
        cancelled = client.submit(inputs.model)["id"]
        client.cancel(cancelled)
    assert run(capsys, server, "status", cancelled)[0] == 1


def test_list_table_json_filter_and_limit(capsys, server: Server, inputs: Inputs) -> None:
    code, out, err = run(capsys, server, "list")
    assert code == 0 and out == "" and "no jobs" in err
    with server.client() as client:
        model_id = client.upload_model(inputs.model)["id"]
        ids = [client.submit_ids(model_id)["id"] for _ in range(3)]
        client.cancel(ids[0])
    code, out, _ = run(capsys, server, "list")
    rows = out.splitlines()
    assert code == 0 and rows[0].split() == ["ID", "STATUS", "STAGE", "PROGRESS", "CREATED"]
    assert [row.split()[0] for row in rows[1:]] == ids[::-1]
    code, out, _ = run(capsys, server, "list", "--json", "--limit", "2")
    assert code == 0 and [job["id"] for job in json.loads(out)] == ids[::-1][:2]
    code, out, _ = run(capsys, server, "list", "--status", "cancelled", "--json")
    assert [job["id"] for job in json.loads(out)] == [ids[0]]
    assert run(capsys, server, "list", "--status", "sleeping")[0] == 2  # argparse usage error


def test_cancel(capsys, server: Server, inputs: Inputs, tmp_path: Path) -> None:
    with server.client() as client:
        queued = client.submit(inputs.model)["id"]
        running = client.submit(inputs.model)["id"]
        done = client.submit(inputs.model)["id"]
    server.claim(running)
    drive_to_success(server, done, tmp_path)
    code, out, _ = run(capsys, server, "cancel", queued)
    assert code == 0 and out.strip() == f"{queued}: cancelled"
    code, out, _ = run(capsys, server, "cancel", running)
    assert code == 0 and "cancel requested" in out
    code, out, _ = run(capsys, server, "cancel", done)
    assert code == 0 and "already succeeded" in out
    code, _, err = run(capsys, server, "cancel", "job_unknown")
    assert code == 2 and "404 Not Found" in err and "[not_found]" in err


def test_download_names_all_and_errors(capsys, server: Server, inputs: Inputs, tmp_path: Path) -> None:
    with server.client() as client:
        job_id = client.submit(inputs.model)["id"]
    code, _, err = run(capsys, server, "download", job_id, "--out", str(tmp_path / "early"))
    assert code == 2 and "409" in err and "job_not_finished" in err
    contents = drive_to_success(server, job_id, tmp_path)
    code, out, _ = run(capsys, server, "download", job_id, "model.ts", "--out", str(tmp_path / "one"))
    assert code == 0 and out.strip() == str(tmp_path / "one" / "model.ts")
    assert (tmp_path / "one" / "model.ts").read_bytes() == contents["model.ts"]
    code, out, err = run(capsys, server, "download", job_id, "--out", str(tmp_path / "all"))
    assert code == 0 and len(out.splitlines()) == 2 and "report.json" in err
    for name, content in contents.items():
        assert hashlib.sha256((tmp_path / "all" / name).read_bytes()).digest() == hashlib.sha256(content).digest()
    on_disk = server.storage.artifact_path(job_id, "model.ts")
    on_disk.write_bytes(b"X" * on_disk.stat().st_size)
    code, _, err = run(capsys, server, "download", job_id, "model.ts", "--out", str(tmp_path / "bad"))
    assert code == 2 and "sha256 mismatch" in err and not (tmp_path / "bad" / "model.ts").exists()


def test_api_errors_exit_2_with_the_problem(capsys, server: Server, inputs: Inputs, tmp_path: Path) -> None:
    code, _, err = run(capsys, server, "submit", str(inputs.model), "--spec", '{"prune": {"amount": 1.5, "colour": "red"}}')
    assert code == 2 and "422 Unprocessable" in err and "[invalid_spec]" in err
    assert "spec.prune.amount:" in err and "spec.prune.colour:" in err
    code, _, err = run(capsys, server, "status", "job_unknown", key="wrong-key-0123456789")
    assert code == 2 and "401 Unauthorized" in err
    code, _, err = run(capsys, server, "submit", str(tmp_path / "missing.ts"))
    assert code == 2 and "model file not found" in err
    code, _, err = run(capsys, server, "submit", str(inputs.model), "--out", str(tmp_path))
    assert code == 2 and "--out needs --wait" in err
    assert run(capsys, server, "status")[0] == 2  # missing JOB_ID


def test_connection_refused_exits_3(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COMPACTOR_URL", f"http://127.0.0.1:{free_port()}")
    code, out, err = run(capsys, None, "list")
    assert code == 3 and out == "" and "cannot reach" in err


def test_registered_on_the_compactor_command(capsys, server: Server, inputs: Inputs, monkeypatch) -> None:
    from launcher import cli

    monkeypatch.setenv("COMPACTOR_URL", server.url)
    monkeypatch.setenv("COMPACTOR_API_KEY", ALICE)
    assert cli.main(["submit", str(inputs.model), "-q"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert cli.main(["status", job_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id


def test_progress_rewrites_one_line_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    line = ProgressLine(stream, min_interval=0.0)
    bar = TransferProgress(line, "upload")
    for sent in (0, 5_000_000, 10_000_000):
        bar(sent, 10_000_000)
    line.done()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and "10.0 MB/10.0 MB" in text and text.rstrip().endswith("B/s")


def test_metrics_summary_without_accuracy() -> None:
    metrics: dict[str, Any] = {"ratios": {"size": 0.3}}
    lines = metrics_summary(metrics)
    assert lines[0].startswith("accuracy:   not measured") and "ratio 0.3" in lines[1]
    assert "batch 1 n/a" in lines[-1]
