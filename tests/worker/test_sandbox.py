"""Untrusted TorchScript is opened in a limited child process before the worker loads it."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from compactor.errors import InvalidModel
from compactor.jobs import JobStatus
from compactor.settings import Settings
from compactor.storage import LocalStorage
from compactor.store import open_store
from compactor.store.base import JobStore
from tests.worker.support import QUICK_SPEC, create_job, write_torchscript_model
from worker.runner import Outcome, execute_job
from worker.sandbox import probe_torchscript


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_torchscript_model(tmp_path_factory.mktemp("sandbox") / "tiny.ts")


def corrupt_constants(source: Path, destination: Path) -> Path:
    """The archive with its constants.pkl replaced by bytes the unpickler chokes on."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(destination, "w") as zout:
        names = [info.filename for info in zin.infolist()]
        assert any(name.endswith("constants.pkl") for name in names)
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("constants.pkl"):
                data = b"\x80\x02ctorch\nnot_a_thing\nq\x00)\x81q\x01." + b"\xff" * 64
            zout.writestr(info, data)
    return destination


def test_a_good_archive_passes(good_archive: Path) -> None:
    probe_torchscript(good_archive, timeout_seconds=120)


def test_a_corrupt_constants_pickle_is_invalid_model(good_archive: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match="cannot be loaded safely"):
        probe_torchscript(corrupt_constants(good_archive, tmp_path / "bad.ts"), timeout_seconds=120)


def test_the_memory_limit_applies_to_the_child(tmp_path: Path) -> None:
    # 48 MB of weights and no room beyond what the child already maps: the load fails
    # in the child, not here.
    import torch

    big = tmp_path / "big.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3000, 4000)), str(big))
    probe_torchscript(big, timeout_seconds=120)
    with pytest.raises(InvalidModel, match="cannot be loaded safely"):
        probe_torchscript(big, timeout_seconds=120, address_space_bytes=0)


def test_the_time_limit_stops_the_child(good_archive: Path) -> None:
    with pytest.raises(InvalidModel, match="longer than"):
        probe_torchscript(good_archive, timeout_seconds=0)


@pytest.fixture()
def parts(tmp_path: Path) -> Iterator[tuple[Settings, JobStore, LocalStorage]]:
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=3.0, heartbeat_seconds=0.2)
    store = open_store(settings.effective_store_url)
    yield settings, store, LocalStorage(settings.resolved_data_dir)
    store.close()


def test_a_job_with_a_poisoned_archive_fails_and_the_next_job_runs(parts, good_archive: Path, tmp_path: Path) -> None:
    settings, store, storage = parts
    poisoned = create_job(store, storage, corrupt_constants(good_archive, tmp_path / "poison.ts"), QUICK_SPEC)
    healthy = create_job(store, storage, good_archive, QUICK_SPEC)

    assert execute_job(poisoned.id, store, storage, settings, "me") is Outcome.finished
    assert execute_job(healthy.id, store, storage, settings, "me") is Outcome.finished

    failed, succeeded = store.get_job(poisoned.id), store.get_job(healthy.id)
    assert failed is not None and failed.status is JobStatus.failed
    assert failed.error is not None and failed.error.code == "invalid_model", failed.error
    assert succeeded is not None and succeeded.status is JobStatus.succeeded
