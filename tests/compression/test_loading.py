"""worker.compression.loading on real files: TorchScript, torch.save state_dicts, safetensors, and hostile uploads."""

from __future__ import annotations

import pathlib
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

from compactor.errors import InvalidModel, InvalidSpec, ModelTooLarge, UnsafeModel
from compactor.spec import ModelSpec
from tests.support.models import TinyCNN
from worker.compression.loading import LoadLimits, build_architecture, load_model

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:FutureWarning")

RESNET18_10 = ModelSpec(arch="resnet18", arch_kwargs={"num_classes": 10})


class TouchOnUnpickle:
    """Unpickling this creates ``path``: a canary for code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture(scope="module")
def resnet18_10() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    # Non-default statistics, so a load that silently kept fresh buffers would differ.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return model


@pytest.fixture()
def tiny_cnn() -> TinyCNN:
    """Seeded and untrained: loading cares about weights round-tripping, not accuracy (and training costs minutes on 2 busy cores)."""
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_same_outputs(loaded: torch.nn.Module, original: torch.nn.Module, inputs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), original(inputs))


def test_torchscript_upload_loads_and_matches(tmp_path: Path, tiny_cnn: TinyCNN) -> None:
    path = tmp_path / "upload"
    torch.jit.save(torch.jit.script(tiny_cnn), path)
    loaded = load_model(path, ModelSpec(), trusted_code=True)
    assert loaded.format == "torchscript" and loaded.scripted and loaded.arch is None
    _assert_same_outputs(loaded.module, tiny_cnn, torch.rand(4, 1, 8, 8))


def test_state_dict_upload_loads_into_the_named_arch(tmp_path: Path, resnet18_10: torch.nn.Module, probe: torch.Tensor) -> None:
    path = tmp_path / "upload"
    torch.save(resnet18_10.state_dict(), path)
    loaded = load_model(path, RESNET18_10)
    assert loaded.format == "state_dict" and not loaded.scripted and loaded.arch == "resnet18"
    assert not loaded.module.training
    assert int(loaded.module.bn1.num_batches_tracked) == 7
    _assert_same_outputs(loaded.module, resnet18_10, probe)


def test_safetensors_upload_loads_into_the_named_arch(tmp_path: Path, resnet18_10: torch.nn.Module, probe: torch.Tensor) -> None:
    path = tmp_path / "upload"
    safetensors.torch.save_file(resnet18_10.state_dict(), path)
    loaded = load_model(path, RESNET18_10.model_copy(update={"format": "safetensors"}))
    assert loaded.format == "safetensors"
    _assert_same_outputs(loaded.module, resnet18_10, probe)


def test_checkpoints_without_batchnorm_counters_load_with_zero_counters(tmp_path: Path, resnet18_10: torch.nn.Module, probe: torch.Tensor) -> None:
    tensors = {key: value for key, value in resnet18_10.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / "upload"
    safetensors.torch.save_file(tensors, path)
    loaded = load_model(path, RESNET18_10).module
    _assert_same_outputs(loaded, resnet18_10, probe)
    assert int(loaded.bn1.num_batches_tracked) == 0


def test_wrapped_and_data_parallel_state_dicts_load(tmp_path: Path, resnet18_10: torch.nn.Module, probe: torch.Tensor) -> None:
    prefixed = OrderedDict((f"module.{key}", value) for key, value in resnet18_10.state_dict().items())
    path = tmp_path / "upload"
    torch.save({"state_dict": prefixed, "epoch": 3}, path)
    _assert_same_outputs(load_model(path, RESNET18_10).module, resnet18_10, probe)


def test_weights_only_upload_requires_arch(tmp_path: Path, tiny_cnn: TinyCNN) -> None:
    path = tmp_path / "upload"
    torch.save(tiny_cnn.state_dict(), path)
    with pytest.raises(InvalidSpec, match="model.arch") as caught:
        load_model(path, ModelSpec())
    assert caught.value.code == "invalid_spec" and caught.value.field == "model.arch"


def test_weights_that_do_not_fit_the_arch_are_named(tmp_path: Path, resnet18_10: torch.nn.Module) -> None:
    path = tmp_path / "upload"
    torch.save(resnet18_10.state_dict(), path)

    with pytest.raises(InvalidModel) as wrong_classes:
        load_model(path, ModelSpec(arch="resnet18", arch_kwargs={"num_classes": 100}))
    assert wrong_classes.value.code == "invalid_model"
    assert "fc.weight is [10, 512], resnet18 needs [100, 512]" in wrong_classes.value.message
    assert "arch_kwargs" in wrong_classes.value.message

    with pytest.raises(InvalidModel) as wrong_arch:
        load_model(path, ModelSpec(arch="resnet34", arch_kwargs={"num_classes": 10}))
    assert "missing keys: layer1.2.conv1.weight" in wrong_arch.value.message
    assert "more" in wrong_arch.value.message  # long lists are cut to a few keys


def test_unknown_arch_and_bad_kwargs_are_spec_errors() -> None:
    with pytest.raises(InvalidSpec) as unknown:
        build_architecture("resnet19", {})
    assert unknown.value.field == "model.arch" and "resnet18" in unknown.value.message

    with pytest.raises(InvalidSpec) as bad_kwargs:
        build_architecture("resnet18", {"colour": "blue"})
    assert bad_kwargs.value.field == "model.arch_kwargs" and "colour" in bad_kwargs.value.message

    with pytest.raises(InvalidSpec, match="negative"):
        build_architecture("resnet18", {"num_classes": -1})


def test_builders_never_fetch_weights() -> None:
    from pydantic import ValidationError

    for kwargs in ({"weights": "DEFAULT"}, {"pretrained": True}, {"checkpoint_path": "/etc/passwd"}, {"pretrained_cfg_overlay": "x"}):
        with pytest.raises(ValidationError, match="never downloaded"):
            ModelSpec(arch="timm/resnet18d", arch_kwargs=kwargs)
        for arch in ("resnet18", "timm/resnet18d"):
            with pytest.raises(InvalidSpec, match="never downloaded") as refused:
                build_architecture(arch, kwargs)
            assert refused.value.field == "model.arch_kwargs"
    # Builder arguments that only build are not mistaken for fetching ones.
    assert ModelSpec(arch="googlenet", arch_kwargs={"init_weights": False, "transform_input": False}).arch_kwargs["init_weights"] is False


def test_a_timm_state_dict_loads_into_its_timm_architecture(tmp_path: Path, probe: torch.Tensor) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18d", pretrained=False, num_classes=10).eval()
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    loaded = load_model(path, ModelSpec(arch="timm/resnet18d", arch_kwargs={"num_classes": 10}))
    assert loaded.arch == "timm/resnet18d"
    with torch.no_grad():
        assert torch.equal(loaded.module(probe), model(probe))
    with pytest.raises(InvalidSpec) as unknown:
        build_architecture("timm/resnet18e", {})
    assert unknown.value.field == "model.arch" and "timm/resnet18d" in unknown.value.message
    with pytest.raises(InvalidModel, match="do not fit timm/resnet18d"):
        load_model(path, ModelSpec(arch="timm/resnet18d", arch_kwargs={"num_classes": 7}))


def test_detection_models_are_not_offered_as_architectures() -> None:
    with pytest.raises(InvalidSpec):
        build_architecture("fasterrcnn_resnet50_fpn", {})


def test_nan_and_inf_weights_are_refused(tmp_path: Path, tiny_cnn: TinyCNN, resnet18_10: torch.nn.Module) -> None:
    tiny_cnn.classifier.weight.data[0, 0] = float("nan")
    scripted = tmp_path / "scripted"
    torch.jit.save(torch.jit.script(tiny_cnn), scripted)
    with pytest.raises(InvalidModel, match="NaN or Inf values in classifier.weight"):
        load_model(scripted, ModelSpec(), trusted_code=True)

    state = resnet18_10.state_dict()
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("inf"))
    weights = tmp_path / "weights"
    torch.save(state, weights)
    with pytest.raises(InvalidModel, match="NaN or Inf values in fc.bias") as caught:
        load_model(weights, RESNET18_10)
    assert caught.value.code == "invalid_model"


def test_parameter_budget_is_checked(tmp_path: Path, tiny_cnn: TinyCNN, resnet18_10: torch.nn.Module) -> None:
    scripted = tmp_path / "scripted"
    torch.jit.save(torch.jit.script(tiny_cnn), scripted)
    weights = tmp_path / "weights"
    torch.save(resnet18_10.state_dict(), weights)
    small = LoadLimits(max_parameters=1000)
    for path, spec in ((scripted, ModelSpec()), (weights, RESNET18_10)):
        with pytest.raises(ModelTooLarge) as caught:
            load_model(path, spec, small, trusted_code=True)
        assert caught.value.code == "model_too_large"


def test_huge_arch_kwargs_are_refused_before_allocating(tmp_path: Path, tiny_cnn: TinyCNN) -> None:
    path = tmp_path / "upload"
    torch.save(tiny_cnn.state_dict(), path)
    # 512 * 10**9 head weights: only counting on the meta device keeps this from allocating 2 TB.
    with pytest.raises(ModelTooLarge, match="resnet18 with these arch_kwargs"):
        load_model(path, ModelSpec(arch="resnet18", arch_kwargs={"num_classes": 10**9}))


def test_pickled_module_and_reduce_payload_never_run(tmp_path: Path, tiny_cnn: TinyCNN) -> None:
    whole = tmp_path / "whole"
    torch.save(tiny_cnn, whole)  # unsafe-on-purpose
    with pytest.raises(UnsafeModel):
        load_model(whole, ModelSpec(arch="resnet18"))

    canary = tmp_path / "canary"
    payload = tmp_path / "payload"
    state = dict(tiny_cnn.state_dict())
    state["classifier.bias"] = TouchOnUnpickle(canary)  # type: ignore[assignment]
    torch.save(state, payload)
    with pytest.raises(UnsafeModel) as caught:
        load_model(payload, ModelSpec(arch="resnet18"))
    assert caught.value.code == "unsafe_model"
    assert not canary.exists()


def test_declared_format_contradicting_content_is_refused(tmp_path: Path, tiny_cnn: TinyCNN) -> None:
    path = tmp_path / "upload"
    torch.jit.save(torch.jit.script(tiny_cnn), path)
    with pytest.raises(InvalidSpec) as caught:
        load_model(path, ModelSpec(format="state_dict", arch="resnet18"))
    assert caught.value.field == "model.format"


def test_broken_torchscript_code_is_invalid_model(tmp_path: Path, tiny_cnn: TinyCNN) -> None:
    original = tmp_path / "original"
    torch.jit.save(torch.jit.script(tiny_cnn), original)
    broken = tmp_path / "broken"
    broke = 0
    with zipfile.ZipFile(original) as zin, zipfile.ZipFile(broken, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            # TorchScript mangles class names once a class was scripted before in this process
            # (code/__torch__/tests/support/models/___torch_mangle_N.py), so match on content.
            if "/code/__torch__/" in info.filename and info.filename.endswith(".py") and b"def forward" in data:
                data = b"def forward(self) -> Tensor:\n    return )))\n"
                broke += 1
            zout.writestr(info.filename, data)
    assert broke >= 1
    # The code is read before torch ever sees it (the allowlist scan), so that is where it fails.
    with pytest.raises(InvalidModel, match="archive's code cannot be read.*not valid Python syntax") as caught:
        load_model(broken, ModelSpec(), trusted_code=True)
    assert caught.value.code == "invalid_model"


def test_uploaded_torchscript_loads_only_in_a_confined_process(tmp_path: Path, tiny_cnn: TinyCNN, monkeypatch) -> None:
    # This test process is not confined: an upload is refused before torch.jit.load ever sees it.
    path = tmp_path / "upload"
    torch.jit.save(torch.jit.script(tiny_cnn), path)

    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("torch.jit.load ran on an upload outside a confined process")

    monkeypatch.setattr(torch.jit, "load", never)
    with pytest.raises(UnsafeModel, match="only inside a confined job process"):
        load_model(path, ModelSpec())
