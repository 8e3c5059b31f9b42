"""compactor.formats on real files: torch.save / torch.jit.save / safetensors / numpy output, and crafted attacks."""

from __future__ import annotations

import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from compactor.errors import InvalidDataset, InvalidModel, InvalidSpec, UnsafeModel, UnsupportedModelFormat
from compactor.formats import (
    ArchiveLimits,
    check_declared_format,
    detect_dataset_format,
    detect_model_format,
    disallowed_globals,
    pickle_globals,
)
from tests.support.models import TinyCNN

REPO_ROOT = Path(__file__).resolve().parents[1]
# torch 2.14 deprecates TorchScript; the API still accepts it, so the tests write it.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:FutureWarning")


def _sbu(text: str) -> bytes:
    """SHORT_BINUNICODE opcode pushing ``text``."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


class TouchOnUnpickle:
    """Unpickling this creates ``path``: a canary for code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _with_data_pkl(source: Path, target: Path, pickle_bytes: bytes) -> Path:
    """A copy of a torch.save zip whose data.pkl is replaced: a well-formed archive with a hostile pickle."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, pickle_bytes if info.filename.endswith("/data.pkl") else zin.read(info))
    return target


@pytest.fixture()
def tiny_state_dict_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"  # names never matter: detection reads bytes
    torch.save(TinyCNN().state_dict(), path)
    return path


# ------------------------------------------------------------- real formats


def test_formats_module_does_not_import_torch() -> None:
    code = "import sys, compactor.formats; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_detects_state_dict_torchscript_and_safetensors_from_bytes(tmp_path: Path, tiny_state_dict_file: Path) -> None:
    model = TinyCNN().eval()
    scripted = tmp_path / "model.safetensors"  # a misleading name on purpose
    torch.jit.save(torch.jit.script(model), scripted)
    tensors = tmp_path / "model.pt"
    safetensors.torch.save_file(model.state_dict(), tensors)

    assert detect_model_format(tiny_state_dict_file) == "state_dict"
    assert detect_model_format(scripted) == "torchscript"
    assert detect_model_format(tensors) == "safetensors"


def test_every_dtype_torch_writes_for_plain_tensors_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "dtypes.pt"
    dtypes = [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.uint16,
        torch.float8_e4m3fn,
        torch.complex64,
    ]
    tensors = {str(dtype): torch.zeros(2, dtype=dtype) for dtype in dtypes}
    tensors["param"] = torch.nn.Parameter(torch.ones(3))
    tensors["view"] = torch.arange(10.0)[2:5]
    tensors["nested"] = {"a_set": {1, 2}, "device": torch.device("cpu"), "size": torch.Size([1, 2])}  # type: ignore[assignment]
    torch.save(tensors, path)
    assert detect_model_format(path) == "state_dict"


def test_pickled_whole_module_is_unsafe_and_names_the_class(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(TinyCNN(), path)  # unsafe-on-purpose
    with pytest.raises(UnsafeModel) as caught:
        detect_model_format(path)
    assert caught.value.code == "unsafe_model"
    assert "tests.support.models.TinyCNN" in caught.value.message
    assert "TorchScript" in caught.value.message and "safetensors" in caught.value.message


def test_reduce_payload_is_refused_without_running(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "payload.pt"
    torch.save({"weight": torch.zeros(2), "x": TouchOnUnpickle(canary)}, path)
    with pytest.raises(UnsafeModel) as caught:
        detect_model_format(path)
    assert "pathlib" in caught.value.message
    assert not canary.exists()


def test_stack_global_operands_are_tracked_through_the_memo(tmp_path: Path, tiny_state_dict_file: Path) -> None:
    # Strings memoised, popped, fetched back: only memo tracking sees os.system.
    hostile = b"\x80\x04" + _sbu("os") + b"\x94" + _sbu("system") + b"\x94" + b"00" + b"h\x00h\x01\x93" + _sbu("true") + b"\x85R."
    assert pickle_globals(hostile) == ["os.system"]
    path = _with_data_pkl(tiny_state_dict_file, tmp_path / "memo.pt", hostile)
    with pytest.raises(UnsafeModel, match="os.system"):
        detect_model_format(path)


def test_stack_global_is_not_fooled_by_strings_discarded_with_pop_mark() -> None:
    # The two most recent strings are allowlisted names, but POP_MARK drops
    # them: STACK_GLOBAL really resolves os.system.
    hostile = b"\x80\x04" + _sbu("os") + _sbu("system") + b"(" + _sbu("collections") + _sbu("OrderedDict") + b"1\x93)R."
    assert disallowed_globals(hostile) == ["os.system"]


def test_stack_global_with_computed_operands_is_refused() -> None:
    computed = b"\x80\x04" + _sbu("os") + b"K\x01\x93)R."  # a module string and an int
    assert disallowed_globals(computed) == ["<STACK_GLOBAL with computed operands>"]


def test_legacy_raw_pickle_is_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(TinyCNN().state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeModel):
        detect_model_format(path)


def test_random_bytes_and_empty_files_are_unsupported(tmp_path: Path) -> None:
    noise = tmp_path / "noise"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (noise, empty):
        with pytest.raises(UnsupportedModelFormat) as caught:
            detect_model_format(path)
        assert caught.value.code == "unsupported_model_format"


def test_truncated_archive_is_invalid(tmp_path: Path, tiny_state_dict_file: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_state_dict_file.read_bytes()[:5000])
    with pytest.raises(InvalidModel) as caught:
        detect_model_format(truncated)
    assert caught.value.code == "invalid_model"
    assert "truncated" in caught.value.message


def test_npz_uploaded_as_model_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, inputs=np.zeros((2, 3), np.float32))
    with pytest.raises(UnsupportedModelFormat, match="npz"):
        detect_model_format(path)


# -------------------------------------------------------------- zip checks


def _zip(path: Path, entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("names", "complaint"),
    [
        (["archive/data.pkl", "archive/../../etc/passwd"], "'..'"),
        (["archive/data.pkl", "/etc/passwd"], "absolute"),
        (["archive/data.pkl", "archive\\..\\x"], "backslash"),
        (["archive/data.pkl", "other/data/0"], "top-level folders"),
    ],
)
def test_hostile_entry_names_are_refused(tmp_path: Path, names: list[str], complaint: str) -> None:
    path = _zip(tmp_path / "names.zip", [(name, b"x") for name in names])
    with pytest.raises(InvalidModel, match=complaint) as caught:
        detect_model_format(path)
    assert caught.value.code == "invalid_model"


def test_duplicate_entry_names_are_refused(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = _zip(tmp_path / "dup.zip", [("archive/data.pkl", b"a"), ("archive/data.pkl", b"b")])
    with pytest.raises(InvalidModel, match="two entries"):
        detect_model_format(path)


def test_compression_bomb_entry_count_and_byte_budget_are_enforced(tmp_path: Path) -> None:
    bomb = _zip(tmp_path / "bomb.zip", [("archive/data.pkl", b"."), ("archive/data/0", bytes(8 * 1024 * 1024))], zipfile.ZIP_DEFLATED)
    with pytest.raises(InvalidModel, match="compression bomb"):
        detect_model_format(bomb)

    many = _zip(tmp_path / "many.zip", [(f"archive/data/{index}", b"x") for index in range(20)])
    with pytest.raises(InvalidModel, match="entries"):
        detect_model_format(many, ArchiveLimits(max_entries=10))

    big = _zip(tmp_path / "big.zip", [("archive/data.pkl", b"."), ("archive/data/0", bytes(4096))])
    with pytest.raises(InvalidModel, match="uncompressed bytes"):
        detect_model_format(big, ArchiveLimits(max_total_uncompressed_bytes=1024))


def test_overlapping_entries_are_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "overlap.zip", [("archive/data.pkl", b"." * 100), ("archive/data/0", b"y" * 100)])
    raw = bytearray(path.read_bytes())
    # Point the second central-directory record at the first entry's local header.
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 42, 0)
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidModel, match="overlaps"):
        detect_model_format(path)


# ------------------------------------------------------------- safetensors


def test_safetensors_header_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4, 4)}, good)
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-8])
    with pytest.raises(InvalidModel, match="outside the file"):
        detect_model_format(truncated)

    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(raw + bytes(8))
    with pytest.raises(InvalidModel, match="cover"):
        detect_model_format(trailing)

    header = b'{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,640]}}'
    out_of_file = tmp_path / "offsets.safetensors"
    out_of_file.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(InvalidModel, match="offsets"):
        detect_model_format(out_of_file)

    header_past_end = tmp_path / "header.safetensors"
    header_past_end.write_bytes(struct.pack("<Q", 10_000) + b'{"w": 1}')
    with pytest.raises(InvalidModel, match="past the end"):
        detect_model_format(header_past_end)


# ------------------------------------------------------- declared formats


def test_declared_format_must_match_content() -> None:
    check_declared_format("auto", "torchscript")
    check_declared_format("state_dict", "state_dict")
    with pytest.raises(InvalidSpec) as caught:
        check_declared_format("torchscript", "state_dict")
    assert caught.value.code == "invalid_spec"
    assert caught.value.field == "model.format"


# --------------------------------------------------------------- datasets


def test_dataset_formats_are_detected(tmp_path: Path) -> None:
    pt = tmp_path / "a"
    torch.save({"inputs": torch.zeros(4, 3), "targets": torch.arange(4)}, pt)
    npz = tmp_path / "b"
    with npz.open("wb") as handle:
        np.savez_compressed(handle, inputs=np.random.default_rng(0).random((4, 3)), targets=np.arange(4))
    assert detect_dataset_format(pt) == "pt"
    assert detect_dataset_format(npz) == "npz"


def test_object_dtype_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, inputs=np.array([[1.0], [None]], dtype=object))
    with pytest.raises(InvalidDataset, match="object dtype") as caught:
        detect_dataset_format(path)
    assert caught.value.code == "invalid_dataset"


def test_pickled_objects_in_pt_dataset_are_refused_without_running(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "data.pt"
    torch.save({"inputs": torch.zeros(4, 3), "extra": TouchOnUnpickle(canary)}, path)
    with pytest.raises(InvalidDataset, match="pathlib") as caught:
        detect_dataset_format(path)
    assert caught.value.code == "invalid_dataset"
    assert not canary.exists()


def test_non_archive_dataset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"inputs": [1, 2]}, protocol=2))
    with pytest.raises(InvalidDataset, match="pickle"):
        detect_dataset_format(path)
    assert os.path.getsize(path) > 0


# -- the scan's own memory bounds (tests/service/test_upload_memory.py measures them end to end)


def test_a_memo_key_out_of_sequence_is_refused_before_any_unpickler_sizes_a_table_to_it() -> None:
    import compactor.formats.pickle_scan as formats

    # PROTO 2, EMPTY_DICT, LONG_BINPUT 2**28, STOP: C's unpickler would allocate a 2**28-slot memo.
    bomb = b"\x80\x02}r" + struct.pack("<I", 2**28) + b"."
    with pytest.raises(formats.MalformedPickle, match="out of sequence"):
        formats.pickle_globals(bomb)
    # The same object memoized at key 0 is an ordinary pickle.
    assert formats.pickle_globals(b"\x80\x02}r" + struct.pack("<I", 0) + b".") == []
    # A real state_dict numbers its memo 0, 1, 2, ...: it passes.
    import io

    buffer = io.BytesIO()
    pickle.dump({"weight": [1.0, 2.0], "bias": (3, 4)}, buffer, protocol=2)
    assert formats.pickle_globals(buffer.getvalue()) == []


def test_the_scan_stack_and_memo_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import compactor.formats.pickle_scan as formats

    monkeypatch.setattr(formats, "MAX_PICKLE_STACK_ITEMS", 50)
    pushes = b"\x80\x02" + b"K\x01" * 60 + b"."  # 60 one-byte BININT1 pushes
    with pytest.raises(formats.MalformedPickle, match="stack grows past 50"):
        formats.pickle_globals(pushes)
    monkeypatch.setattr(formats, "MAX_PICKLE_STACK_ITEMS", 100_000)
    monkeypatch.setattr(formats, "MAX_PICKLE_MEMO_ITEMS", 10)
    memoized = b"\x80\x04" + b"K\x01\x94" * 11 + b"."  # 11 × (BININT1, MEMOIZE)
    with pytest.raises(formats.MalformedPickle, match="memoizes more than 10"):
        formats.pickle_globals(memoized)


def test_a_central_directory_over_its_budget_is_refused_before_zipfile_parses_it(tmp_path: Path) -> None:
    from compactor.formats import ArchiveLimits

    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(200):
            archive.writestr(f"archive/{'n' * 100}{index}", b"x")
    limits = ArchiveLimits(max_central_directory_bytes=4096)
    with pytest.raises(InvalidModel, match="central directory is .* bytes, above the limit of 4096"):
        detect_model_format(path, limits)
    # Within budget, the archive is judged on its content instead (here: not a model).
    with pytest.raises(InvalidModel) as within:
        detect_model_format(path, ArchiveLimits())
    assert "central directory" not in str(within.value)
