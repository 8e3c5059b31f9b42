"""The README's curl examples, run as written against a live ``compactor serve``.

Every ```bash block of the "Using the API with curl" section runs in order in one
bash session (``localhost:8000`` pointed at the test server), with ``resnet.pt``
(a resnet18 state_dict trained briefly on digits) and ``train.pt`` (digits,
3×32×32) in the working directory. Then the downloaded ``model.ts`` is loaded
with plain torch in a fresh process and scored on held-out digits.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from tests.e2e.test_serve import Serve
from tests.support.models import top1, train_classifier

README = Path(__file__).resolve().parents[2] / "README.md"
TRAIN_SAMPLES = 480


def curl_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Using the API with curl", 1)[1].split("\n## ", 1)[0]
    return [block for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "curl" in block]


def digits_rgb32() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return (images[order] - 0.5) / 0.5, torch.tensor(digits.target)[order]


def test_readme_curl_examples_run_against_a_live_server(tmp_path: Path) -> None:
    blocks = curl_blocks()
    assert len(blocks) >= 3, "the README lost its curl examples"
    inputs, targets = digits_rgb32()
    train_x, train_y = inputs[:TRAIN_SAMPLES], targets[:TRAIN_SAMPLES]
    test_x, test_y = inputs[TRAIN_SAMPLES : TRAIN_SAMPLES + 400], targets[TRAIN_SAMPLES : TRAIN_SAMPLES + 400]
    torch.manual_seed(0)
    model = train_classifier(torchvision.models.resnet18(num_classes=10), train_x, train_y, epochs=3, lr=1e-3)
    original_top1 = top1(model, test_x, test_y)
    work = tmp_path / "work"
    work.mkdir()
    torch.save(model.state_dict(), work / "resnet.pt")
    torch.save({"inputs": train_x, "targets": train_y}, work / "train.pt")
    torch.save({"inputs": test_x, "targets": test_y}, tmp_path / "heldout.pt")

    serve = Serve(tmp_path / "data", tmp_path / "serve.log")
    try:
        script = "set -euo pipefail\n" + "\n".join(block.replace("localhost:8000", f"127.0.0.1:{serve.port}") for block in blocks)
        done = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\nserver log:\n{serve.proc.log()[-3000:]}"
    finally:
        serve.close()

    job = json.loads((work / "job.json").read_text())
    report = json.loads((work / "report.json").read_text())
    assert report["compressed"]["macs"] < 0.5 * report["original"]["macs"]
    assert report["quantization"]["mode"] == "static"
    # the error example printed the problem JSON with its code and the field at fault
    assert '"invalid_spec"' in done.stdout and '"amount"' in done.stdout
    assert job["status"] == "queued"
    # the events stream's last event is the finished job; /metrics sums the worker's series into
    # the gateway's (one PROMETHEUS_MULTIPROC_DIR for the serve tree) and reads the store
    assert '"status": "succeeded"' in done.stdout and '"progress": 1' in done.stdout
    assert re.search(r'^compactor_job_duration_seconds_count\{status="succeeded"\} [12]\.0$', done.stdout, re.M), done.stdout
    assert re.search(r'^compactor_jobs\{status="succeeded"\} [12]\.0$', done.stdout, re.M), done.stdout

    # What a user does with the file: plain torch, a fresh interpreter, no Compactor code.
    scoring = (
        "import sys, torch\n"
        "model = torch.export.load(sys.argv[1]).module() if sys.argv[1].endswith('.pt2') else torch.jit.load(sys.argv[1])\n"
        "data = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.inference_mode():\n"
        "    print((model(data['inputs']).argmax(1) == data['targets']).float().mean().item())\n"
    )

    def held_out_top1(artifact: str) -> float:
        scored = subprocess.run(
            [sys.executable, "-I", "-W", "ignore", "-c", scoring, str(work / artifact), str(tmp_path / "heldout.pt")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert scored.returncode == 0, scored.stderr
        return float(scored.stdout.strip())

    heldout_top1 = held_out_top1("model.ts")
    # model.pt2 is the float compressed model: plain torch.export.load, close to the INT8 model.ts.
    assert abs(held_out_top1("model.pt2") - heldout_top1) <= 0.05, heldout_top1
    numbers = f"held-out {heldout_top1:.3f}, original held-out {original_top1:.3f}, report {report['compressed']['accuracy']}"
    # A briefly trained model, half its channels removed, two epochs to recover: far above
    # chance (0.1), and the report's validation figure predicts the held-out one.
    assert heldout_top1 >= 0.5, numbers
    assert abs(heldout_top1 - report["compressed"]["accuracy"]["top1"]) <= 0.15, numbers
