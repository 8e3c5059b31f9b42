"""Crafted archives against a real ``compactor gateway`` process: refused with 422 and the
right ``code``, and the gateway's peak RSS stays bounded while it refuses them.

Each archive costs little to upload and, without the checks in ``compactor.formats``, a great
deal to open: a deflate bomb (256 MiB of zeros in 260 KB), an entry declaring 4 GB, 20,000
entries, a central directory that lies about its entry count, names outside the archive's
folder, and pickles that make an unpickler (or the pickle scan itself) allocate far more than
their size. Measured before those checks, per upload: ``LONG_BINPUT`` with key 2**28 in a
200-byte .pt dataset, +4 GiB (C's unpickler sized its memo table to the key while the gateway
counted samples); a 12 MiB pickled dict of ints, +195 MiB; 300,000 central-directory records
in 18 MB, +138 MiB; 16 M one-byte pushes, +162 MiB. With them, each peak is under 20 MiB.

The peak is VmHWM from /proc, reset (``clear_refs``) before each upload, compared with VmRSS
just before it. The bound, 64 MiB, is what a refused upload may legitimately cost: the body
arrives in batches of about 1 MiB, a central directory is read only up to 2 MiB (at worst
~26 MiB of parsed entries), the pickle scan holds at most 100,000 stack and 4,000,000 memo
slots (~33 MiB), and a model's pickle (16 MiB here) is read whole.

The worker runs the same checks before torch sees a file (worker/compression: load_model and
load_dataset call detect_*_format first); uploads reach it only through the gateway, but the
last test hands it the archives directly, as if the storage had been tampered with.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.gateway import ALICE, auth
from tests.support.jobs import REPO_ROOT
from tests.support.live_gateway import MIB, LiveGateway

PEAK_GROWTH_BOUND = 64 * MIB
MAX_UPLOAD_BYTES = 32 * MIB


# -- crafting archives


def zip_bytes(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def deflate_bomb(inner_name: str, head: bytes, zero_bytes: int, others: list[tuple[str, bytes]]) -> bytes:
    """``head`` followed by ``zero_bytes`` zeros, deflated (about 1000:1), beside small ``others``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in others:
            archive.writestr(name, data)
        with archive.open(inner_name, "w") as entry:
            entry.write(head)
            block = bytes(MIB)
            for _ in range(zero_bytes // MIB):
                entry.write(block)
    return buffer.getvalue()


def with_declared_size(data: bytes, name: str, declared: int) -> bytes:
    """The archive with entry ``name``'s uncompressed size in the central directory replaced."""
    patched = bytearray(data)
    position = patched.find(b"PK\x01\x02")
    while position >= 0:
        name_length = struct.unpack_from("<H", patched, position + 28)[0]
        if patched[position + 46 : position + 46 + name_length] == name.encode():
            struct.pack_into("<I", patched, position + 24, declared)
            return bytes(patched)
        position = patched.find(b"PK\x01\x02", position + 46)
    raise AssertionError(f"no central directory entry {name!r}")


def central_directory_only(names: list[str], declared_count: int) -> bytes:
    """One empty stored entry (so the file starts like a zip), then central-directory records
    (47+ bytes each, no data of their own) and an end record declaring ``declared_count``
    entries: what zipfile parses on opening, at the least cost to the sender."""
    first = b"archive/version"
    local = struct.pack(zipfile.structFileHeader, zipfile.stringFileHeader, 20, 0, 0, 0, 0, 0x21, 0, 0, 0, len(first), 0)
    records = [
        struct.pack(zipfile.structCentralDir, zipfile.stringCentralDir, 20, 3, 20, 0, 0, 0, 0, 0x21, 0, 0, 0, len(name.encode()), 0, 0, 0, 0, 0, 0)
        + name.encode()
        for name in [first.decode(), *names]
    ]
    directory = b"".join(records)
    end = struct.pack(
        zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, declared_count, declared_count, len(directory), len(local) + len(first), 0
    )
    return local + first + directory + end


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """Just the .npy header of an array of ``shape`` (its data follows separately)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode("latin-1")
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


# A state_dict pickle as torch writes one, minus the tensors: valid for the format scan.
SMALL_PICKLE = pickle.dumps({}, protocol=2)
# PROTO 2, EMPTY_DICT, LONG_BINPUT 2**28, STOP: C's unpickler sizes its memo table to the key.
MEMO_BOMB_PICKLE = b"\x80\x02}r" + struct.pack("<I", 2**28) + b"."
# 16 MiB of NONE (each pushes one item), then STOP: a scan tracking every push holds 16 M items.
STACK_BOMB_PICKLE = b"\x80\x02" + b"N" * (16 * MIB) + b"."


def dict_bomb_pickle(entries: int) -> bytes:
    """A dict of ``entries`` distinct ints, pickled as Python does (SETITEMS per 1,000): no
    globals, a shallow stack, no memo; the scan passes it, an unpickler builds all of it."""
    records = np.zeros(entries, dtype=[("opcode", "S1"), ("key", "<i4"), ("value", "S1")])
    records["opcode"], records["key"], records["value"] = b"J", np.arange(entries), b"N"
    raw = records.tobytes()
    batch = 1000 * records.itemsize
    return b"\x80\x02}" + b"".join(b"(" + raw[start : start + batch] + b"u" for start in range(0, len(raw), batch)) + b"."


@dataclass(frozen=True)
class Crafted:
    endpoint: str
    data: bytes
    code: str
    mentions: str


def craft_archives() -> dict[str, Crafted]:
    torch_layout = [("archive/data.pkl", SMALL_PICKLE), ("archive/version", b"3\n")]
    npz_inputs = [("inputs.npy", npy(np.zeros((4, 2), dtype=np.float32)))]
    huge_declared = zip_bytes([*torch_layout, ("archive/data/0", b"\0" * 100)], zipfile.ZIP_DEFLATED)
    many_entries = zip_bytes([*torch_layout, *((f"archive/data/{i}", b"") for i in range(20_000))])
    # 300,000 entries in a 19 MB central directory whose end record says 3: opened unchecked,
    # zipfile builds all 300,000 ZipInfo objects (~180 MiB) before anything can count them.
    lying_count = central_directory_only([f"archive/data/{i}" for i in range(300_000)], 3)
    return {
        "deflate bomb in a torch archive": Crafted(
            "models", deflate_bomb("archive/data/0", b"", 256 * MIB, torch_layout), "invalid_model", "compression bomb"
        ),
        "deflate bomb in a .npz": Crafted(
            "datasets",
            deflate_bomb("inputs.npy", npy_header((64 * MIB,)), 256 * MIB, []),
            "invalid_dataset",
            "compression bomb",
        ),
        "entry declaring 4 GB": Crafted("models", with_declared_size(huge_declared, "archive/data/0", 4_000_000_000), "invalid_model", "expands"),
        "npz entry declaring 4 GB": Crafted(
            "datasets",
            with_declared_size(zip_bytes(npz_inputs, zipfile.ZIP_DEFLATED), "inputs.npy", 4_000_000_000),
            "invalid_dataset",
            "expands",
        ),
        "20,000 entries": Crafted("models", many_entries, "invalid_model", "more than the limit of 10000"),
        "20,000 entries as a dataset": Crafted("datasets", many_entries, "invalid_dataset", "more than the limit of 10000"),
        "central directory lying about its count": Crafted("models", lying_count, "invalid_model", "central directory"),
        "entry named ../../etc/passwd": Crafted(
            "models", zip_bytes([*torch_layout, ("../../etc/passwd", b"root::0:0::/:/bin/sh\n")]), "invalid_model", "'..'"
        ),
        "absolute entry name": Crafted("datasets", zip_bytes([*npz_inputs, ("/etc/passwd.npy", b"x")]), "invalid_dataset", "absolute path"),
        "entry outside the archive folder": Crafted(
            "models", zip_bytes([*torch_layout, ("other/data.pkl", SMALL_PICKLE)]), "invalid_model", "top-level folders"
        ),
        "memo key 2**28 in a .pt dataset": Crafted(
            "datasets",
            zip_bytes([("archive/data.pkl", MEMO_BOMB_PICKLE), ("archive/version", b"3\n")]),
            "invalid_dataset",
            "out of sequence",
        ),
        "memo key 2**28 in a state_dict": Crafted(
            "models",
            zip_bytes([("archive/data.pkl", MEMO_BOMB_PICKLE), ("archive/version", b"3\n")]),
            "invalid_model",
            "out of sequence",
        ),
        # 12 MiB of pickle, 2 M dict entries: ~160 MiB once unpickled to count samples.
        "dict of 2 M ints as a .pt dataset": Crafted(
            "datasets",
            zip_bytes([("archive/data.pkl", dict_bomb_pickle(2_000_000)), ("archive/version", b"3\n")]),
            "invalid_dataset",
            "above the limit of 1048576",
        ),
        "16 M pushes in a state_dict pickle": Crafted(
            "models",
            zip_bytes([("archive/data.pkl", STACK_BOMB_PICKLE), ("archive/version", b"3\n")]),
            "invalid_model",
            "stack grows past",
        ),
    }


@pytest.fixture(scope="module")
def crafted() -> dict[str, Crafted]:
    archives = craft_archives()
    assert sorted(archives) == sorted(NAMES)
    for name, archive in archives.items():
        assert len(archive.data) < MAX_UPLOAD_BYTES, name
    return archives


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, files) -> Iterator[LiveGateway]:
    root = tmp_path_factory.mktemp("memory")
    server = LiveGateway(root / "data", root / "gateway.log", COMPACTOR_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES))
    # Warm up: what a first upload imports and allocates for good is not an archive's cost.
    with httpx.Client(base_url=server.base_url, headers=auth(ALICE), timeout=30) as client:
        for endpoint, data in (("models", files.state_dict), ("datasets", files.dataset_pt), ("datasets", files.dataset_npz)):
            assert client.post(f"/v1/{endpoint}", files={"file": ("f", data)}).status_code == 201
    yield server
    server.stop()


# Named here too: the archives themselves are built once, at the first test, not at collection.
NAMES = [
    "deflate bomb in a torch archive",
    "deflate bomb in a .npz",
    "entry declaring 4 GB",
    "npz entry declaring 4 GB",
    "20,000 entries",
    "20,000 entries as a dataset",
    "central directory lying about its count",
    "entry named ../../etc/passwd",
    "absolute entry name",
    "entry outside the archive folder",
    "memo key 2**28 in a .pt dataset",
    "memo key 2**28 in a state_dict",
    "dict of 2 M ints as a .pt dataset",
    "16 M pushes in a state_dict pickle",
]


@pytest.mark.parametrize("name", NAMES)
def test_crafted_archive_is_refused_within_a_bounded_peak_rss(gateway: LiveGateway, crafted: dict[str, Crafted], name: str) -> None:
    archive = crafted[name]
    with httpx.Client(base_url=gateway.base_url, headers=auth(ALICE), timeout=60) as client:
        before = gateway.rss_bytes()
        gateway.reset_peak_rss()
        answer = client.post(f"/v1/{archive.endpoint}", files={"file": ("upload", archive.data)})
        growth = gateway.peak_rss_bytes() - before
        assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth / MIB:.1f} MiB ({answer.status_code}: {answer.text})"
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        problem = answer.json()
        assert problem["code"] == archive.code and archive.mentions in problem["detail"], problem
        assert client.get("/healthz").status_code == 200
    assert not list((gateway.data_dir / "tmp").iterdir())


def test_crafted_archive_inside_a_job_submission_is_refused(gateway: LiveGateway, crafted: dict[str, Crafted], files) -> None:
    """POST /v1/jobs checks its parts the same way (a bomb as the dataset of a job)."""
    bomb = crafted["deflate bomb in a .npz"]
    with httpx.Client(base_url=gateway.base_url, headers=auth(ALICE), timeout=60) as client:
        before = gateway.rss_bytes()
        gateway.reset_peak_rss()
        answer = client.post("/v1/jobs", files={"model": ("m", files.torchscript), "dataset": ("d", bomb.data), "spec": (None, "{}")})
        growth = gateway.peak_rss_bytes() - before
    assert (answer.status_code, answer.json()["code"]) == (422, "invalid_dataset"), answer.text
    assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth / MIB:.1f} MiB"


WORKER_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from compactor.errors import CompactorError
    from compactor.spec import parse_spec
    from worker.compression.data import load_dataset
    from worker.compression.loading import load_model


    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


    model_spec = parse_spec(None).model
    results = {}
    for kind, path in json.loads(sys.argv[1]):
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        try:
            load_model(Path(path), model_spec, trusted_code=True) if kind == "models" else load_dataset(Path(path))
            code = None
        except CompactorError as exc:
            code = exc.code
        results[path] = {"code": code, "growth": status("VmHWM") - before}
    print(json.dumps(results))
    """
)


def test_worker_refuses_crafted_archives_before_torch_with_bounded_memory(tmp_path: Path, crafted: dict[str, Crafted]) -> None:
    """The worker's loaders, handed each archive directly: the same refusal, and torch never reads it."""
    paths: list[tuple[str, str]] = []
    for index, archive in enumerate(crafted.values()):
        path = tmp_path / f"crafted-{index}"
        path.write_bytes(archive.data)
        paths.append((archive.endpoint, str(path)))
    result = subprocess.run([sys.executable, "-c", WORKER_PROBE, json.dumps(paths)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    for (name, archive), (_, path) in zip(crafted.items(), paths, strict=True):
        assert measured[path]["code"] == archive.code, (name, measured[path])
        assert measured[path]["growth"] < PEAK_GROWTH_BOUND, (name, measured[path]["growth"] / MIB)
