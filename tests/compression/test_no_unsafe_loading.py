"""No code path unpickles untrusted input: every torch.load is weights_only, every np.load refuses pickles.

Records each call while real uploads of every format (and a pickled module
that must be refused) go through ``compress_files``, and reads the source for
any load call that could bypass the recorder.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compactor.errors import UnsafeModel
from compactor.spec import JobSpec
from tests.support.models import TinyCNN, load_digits_tensors
from worker.compression.pipeline import BenchmarkOptions, compress_files

REPO = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = ("compactor", "service", "worker")


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    calls: list[tuple[str, dict[str, Any]]] = []
    real_torch_load, real_np_load = torch.load, np.load

    def torch_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(("torch.load", kwargs))
        return real_torch_load(*args, **kwargs)

    def np_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(("np.load", kwargs))
        return real_np_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    monkeypatch.setattr(np, "load", np_load)
    return calls


def test_every_load_of_an_upload_is_weights_only(recorded, tmp_path: Path) -> None:
    model = TinyCNN().eval()
    inputs, targets, _, _ = load_digits_tensors()
    script = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), script)
    dataset_pt = tmp_path / "data.pt"
    torch.save({"inputs": inputs[:64], "targets": targets[:64]}, dataset_pt)
    dataset_npz = tmp_path / "data.npz"
    np.savez(dataset_npz, inputs=inputs[:64].numpy(), targets=targets[:64].numpy())
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)  # unsafe-on-purpose: a whole module, which must be refused

    import torchvision

    # A state_dict upload needs a torchvision architecture to load into.
    resnet = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), resnet)
    resnet_spec = {"model": {"arch": "resnet18", "arch_kwargs": {"num_classes": 10}, "input_shape": [1, 3, 32, 32]}}
    quick = BenchmarkOptions(warmup=1, runs=1)
    spec = JobSpec.model_validate({"model": {"input_shape": [1, 1, 8, 8]}, "quantize": {"mode": "dynamic"}})

    compress_files(script, spec, tmp_path / "a", dataset_path=dataset_pt, benchmark=quick, trusted_code=True)
    compress_files(script, spec, tmp_path / "b", dataset_path=dataset_npz, benchmark=quick, trusted_code=True)
    compress_files(resnet, JobSpec.model_validate({**resnet_spec, "quantize": {"mode": "dynamic"}}), tmp_path / "c", benchmark=quick)
    with pytest.raises(UnsafeModel):
        compress_files(pickled, spec, tmp_path / "d", benchmark=quick)

    torch_calls = [kwargs for name, kwargs in recorded if name == "torch.load"]
    numpy_calls = [kwargs for name, kwargs in recorded if name == "np.load"]
    assert torch_calls, "the recorder saw no torch.load: it is not on the path it guards"
    assert numpy_calls, "the recorder saw no np.load"
    assert all(kwargs.get("weights_only") is True for kwargs in torch_calls), torch_calls
    assert all(kwargs.get("allow_pickle") is False for kwargs in numpy_calls), numpy_calls


def _load_calls(tree: ast.AST) -> list[ast.Call]:
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in {"torch", "np", "numpy", "pickle"}:
                calls.append(node)
    return calls


def test_no_product_source_loads_without_the_safe_flag() -> None:
    offenders = []
    for package in PRODUCT_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for call in _load_calls(ast.parse(path.read_text(), str(path))):
                owner = call.func.value.id  # type: ignore[attr-defined]
                flags = {kw.arg: kw.value for kw in call.keywords}
                safe = (owner == "torch" and isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True) or (
                    owner in {"np", "numpy"} and isinstance(flags.get("allow_pickle"), ast.Constant) and flags["allow_pickle"].value is False
                )
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert offenders == []
