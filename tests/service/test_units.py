"""Torch-free helpers: dataset_info (restricted unpickling), compat, queue config."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from compactor.compat import DatasetFacts, check_compatibility
from compactor.errors import InvalidDataset, UnsupportedCombination
from compactor.formats import dataset_info, dataset_num_samples
from compactor.queue import CeleryJobQueue, broker_folders, celery_config
from compactor.spec import JobSpec


def _pt(tmp_path: Path, obj: object, name: str = "d.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_pt_samples_and_targets(tmp_path) -> None:
    path = _pt(tmp_path, {"inputs": torch.zeros(9, 3, 4, 4), "targets": torch.zeros(9, dtype=torch.long)})
    assert dataset_num_samples(path, "pt") == 9
    info = dataset_info(_pt(tmp_path, {"inputs": torch.zeros(5, 2)}, "u.pt"), "pt")
    assert info.num_samples == 5 and not info.has_targets
    sliced = _pt(tmp_path, {"inputs": torch.zeros(10, 2)[2:8]}, "s.pt")  # a view into a larger storage
    assert dataset_num_samples(sliced, "pt") == 6


def test_pt_mismatched_targets(tmp_path) -> None:
    path = _pt(tmp_path, {"inputs": torch.zeros(9, 2), "targets": torch.zeros(8, dtype=torch.long)})
    with pytest.raises(InvalidDataset, match="8 rows"):
        dataset_num_samples(path, "pt")


def test_pt_with_foreign_global_is_refused_and_never_resolved(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w") as archive:
        archive.writestr("d/data.pkl", pickle.dumps({"inputs": Evil()}, protocol=2))
        archive.writestr("d/version", "3\n")
    path = tmp_path / "evil.pt"
    path.write_bytes(raw.getvalue())
    # Two layers: the opcode scan refuses it before anything is unpickled…
    with pytest.raises(InvalidDataset, match=r"\.call', which cannot be loaded without arbitrary unpickling"):
        dataset_num_samples(path, "pt")
    # …and the shape unpickler behind it resolves only tensor rebuilds, whatever reaches it.
    from compactor.formats.datasets import _pt_info

    with zipfile.ZipFile(path) as archive, pytest.raises(InvalidDataset, match=r"\.call, which a dataset never needs"):
        _pt_info(archive, archive.read("d/data.pkl"), "d")
    assert not marker.exists()


def test_npz_reads_headers_only(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((11, 1, 8, 8), dtype=np.float32), targets=np.zeros(11, dtype=np.int64))
    assert dataset_info(path, "npz").has_targets and dataset_num_samples(path, "npz") == 11
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((4, 2)), targets=np.zeros(3))
    with pytest.raises(InvalidDataset, match="3 rows"):
        dataset_num_samples(bad, "npz")
    objects = tmp_path / "obj.npz"
    np.savez(objects, inputs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidDataset):
        dataset_num_samples(objects, "npz")


def test_compat_allows_what_works() -> None:
    labelled = DatasetFacts(format="pt", num_samples=10, has_targets=True)
    unlabelled = DatasetFacts(format="npz", num_samples=10, has_targets=False)
    check_compatibility("torchscript", JobSpec.model_validate({"prune": {"granularity": "unstructured"}, "quantize": {}}), None)
    check_compatibility(
        "state_dict",
        JobSpec.model_validate(
            {"model": {"arch": "resnet18"}, "prune": {"criterion": "hessian"}, "finetune": {}, "target": {"max_accuracy_drop": 0.01}}
        ),
        labelled,
    )
    check_compatibility("safetensors", JobSpec.model_validate({"model": {"arch": "vgg16"}, "finetune": {}}), unlabelled)
    # Channel pruning of TorchScript passes: the worker converts it into a graph (and says why where it cannot).
    check_compatibility("torchscript", JobSpec.model_validate({"prune": {}}), labelled)
    with pytest.raises(UnsupportedCombination) as info:
        check_compatibility("torchscript", JobSpec.model_validate({"prune": {"criterion": "taylor"}}), None)
    assert "magnitude" in info.value.message and info.value.field == "prune.criterion"


def test_celery_config_and_filesystem_queue(make_settings) -> None:
    settings = make_settings()
    config = celery_config(settings)
    options = config["broker_transport_options"]
    assert options["data_folder_in"] == options["data_folder_out"] == str(broker_folders(settings)["messages"])
    assert Path(options["data_folder_in"]).is_dir() and str(settings.resolved_data_dir) in options["control_folder"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"] and config["worker_prefetch_multiplier"] == 1
    assert config["task_time_limit"] > config["task_soft_time_limit"]
    assert config["task_default_queue"] == settings.queue_name
    redis = celery_config(make_settings(broker_url="redis://127.0.0.1:6379/0"))
    assert redis["broker_transport_options"]["visibility_timeout"] > redis["task_time_limit"]
    queue = CeleryJobQueue(settings)
    queue.ping()
    assert queue.depth() == 0
    assert queue.enqueue("job_abc", attempt=2) == "job_abc-2"
    assert queue.depth() == 1
    [message] = broker_folders(settings)["messages"].glob("*.msg")
    assert json.loads(message.read_text())["headers"]["task"] == "compactor.run_job"
    queue.revoke("job_abc", 2)  # best effort, never raises
    queue.close()


def test_importing_the_gateway_does_not_import_torch() -> None:
    code = (
        "import sys, service.app, service.routes.jobs, compactor.compat, compactor.formats, compactor.queue; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'worker'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
