"""Architectures no builder knows, through every door: the module itself, traced TorchScript,
scripted TorchScript and a ``torch.export`` archive. Channel pruning at 50% shrinks each of them as
much as it shrinks the module (MACs ratio within 0.05), and the downloaded artifacts (model.ts,
model.pt2) load in a fresh process with plain torch and reproduce the in-memory model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from compactor.errors import CompactorError
from compactor.spec import JobSpec
from tests.support.architectures import CUSTOM_ARCHITECTURES, build_custom
from tests.support.doors import write_upload
from worker.compression.loading import load_model
from worker.compression.pipeline import BenchmarkOptions, compress

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

DOORS = ("module", "traced", "scripted", "pt2")
SPEC = JobSpec.model_validate({"model": {"input_shape": [1, 1, 8, 8]}, "prune": {"granularity": "channel", "amount": 0.5}})
QUICK = BenchmarkOptions(warmup=1, runs=2, batch_sizes=(1,))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """(architecture, door) → the CompressionResult and its artifact directory, or the error."""
    found: dict[tuple[str, str], Any] = {}
    for name in CUSTOM_ARCHITECTURES:
        model = build_custom(name)
        for door in DOORS:
            directory = tmp_path_factory.mktemp(f"{name}-{door}")
            try:
                if door == "module":
                    result = compress(copy.deepcopy(model), SPEC, out_dir=directory / "out", benchmark=QUICK)
                else:
                    loaded = load_model(write_upload(model, door, directory, torch.randn(2, 1, 8, 8)), SPEC.model, trusted_code=True)
                    result = compress(loaded, SPEC, out_dir=directory / "out", benchmark=QUICK)
            except CompactorError as error:
                found[name, door] = error
                continue
            found[name, door] = (result, directory / "out")
    return found


@pytest.mark.parametrize("name", sorted(CUSTOM_ARCHITECTURES))
def test_every_door_loses_as_many_channels_as_the_module(outcomes, name: str) -> None:
    graph_doors = {door: outcomes[name, door] for door in DOORS if door != "module"}
    for door, outcome in graph_doors.items():
        assert not isinstance(outcome, CompactorError), f"{name} through {door}: {outcome}"
    ratios = {door: outcome[0].metrics["ratios"]["macs"] for door, outcome in graph_doors.items()}
    module = outcomes[name, "module"]
    if name == "attention":
        # The module's own code reshapes into self.heads heads from the channel count it reads at
        # run time: every group that feeds it is kept whole, and the report names them. Its graphs
        # record those shapes as numbers, so their stem, projection and norm channels can go.
        assert not isinstance(module, CompactorError), module
        metrics = module[0].metrics
        assert any("were kept whole" in warning for warning in metrics["warnings"]), metrics["warnings"]
        reference = ratios["pt2"]
        assert reference < 0.8 and metrics["ratios"]["macs"] > reference
    else:
        assert not isinstance(module, CompactorError), module
        reference = module[0].metrics["ratios"]["macs"]
        assert reference < (0.9 if name == "grouped" else 0.5)
    for door, ratio in ratios.items():
        assert ratio == pytest.approx(reference, abs=0.05), (door, ratios, reference)
    for door in ("traced", "scripted"):
        assert graph_doors[door][0].metrics["environment"]["structure"]["converted_from"] == "torchscript"


def test_the_artifacts_load_in_a_fresh_process_and_match_the_compressed_model(outcomes, tmp_path: Path) -> None:
    inputs = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.save(inputs, tmp_path / "inputs.pt")
    expected: dict[str, torch.Tensor] = {}
    for (name, door), outcome in outcomes.items():
        if isinstance(outcome, CompactorError):
            continue
        result, directory = outcome
        assert (directory / "model.ts").exists() and (directory / "model.pt2").exists(), (name, door)
        with torch.no_grad():
            expected[str(directory)] = result.model.eval()(inputs)
    code = (
        "import json, sys, torch\n"
        f"x = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)\n"
        "out = {}\n"
        "for d in json.loads(sys.argv[1]):\n"
        "    with torch.no_grad():\n"
        "        out[d] = [torch.jit.load(d + '/model.ts')(x).tolist(), torch.export.load(d + '/model.pt2').module()(x).tolist()]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, json.dumps(sorted(expected))], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(reloaded) == set(expected)
    for directory, (from_ts, from_pt2) in reloaded.items():
        for what, values in (("model.ts", from_ts), ("model.pt2", from_pt2)):
            assert torch.allclose(torch.tensor(values), expected[directory], atol=1e-4, rtol=1e-4), (directory, what)
