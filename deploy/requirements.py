"""Split pyproject.toml's dependencies into the gateway's and the torch stack's.

    python deploy/requirements.py pyproject.toml OUTDIR   # writes OUTDIR/gateway.txt, OUTDIR/torch.txt

The Dockerfile installs ``gateway.txt`` alone for its torch-free ``gateway`` target and
``gateway.txt`` + ``torch.txt`` for the full image, then the project itself with ``--no-deps``.
Splitting pyproject.toml here (rather than copying a list into the Dockerfile) keeps one source
of truth for versions; tests/test_deploy.py checks that every name in ``TORCH_STACK`` is a real
dependency and that the gateway starts with these packages impossible to import.

Standard library only (it runs in the bare builder before anything is installed).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Imported by the worker only (worker/compression/); compactor/ and service/ never import them.
TORCH_STACK = frozenset({"torch", "torchvision", "torch-pruning", "safetensors", "timm", "onnx", "onnxscript", "onnxruntime"})


def normalize(name: str) -> str:
    """PEP 503 name normalization: ``Torch_Pruning`` → ``torch-pruning``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return normalize(match.group(1))


def service_dependencies(pyproject: Path) -> list[str]:
    """What the service needs: the base dependencies (the client's) and the ``service`` extra."""
    with pyproject.open("rb") as handle:
        project = tomllib.load(handle)["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["service"]]


def split(pyproject: Path) -> tuple[list[str], list[str]]:
    """(gateway requirements, torch-stack requirements), in pyproject.toml's order."""
    dependencies = service_dependencies(pyproject)
    gateway = [req for req in dependencies if requirement_name(req) not in TORCH_STACK]
    torch = [req for req in dependencies if requirement_name(req) in TORCH_STACK]
    return gateway, torch


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python deploy/requirements.py PYPROJECT OUTDIR", file=sys.stderr)
        return 2
    gateway, torch = split(Path(argv[0]))
    missing = TORCH_STACK - {requirement_name(req) for req in torch}
    if missing:
        print(f"TORCH_STACK names packages pyproject.toml does not depend on: {sorted(missing)}", file=sys.stderr)
        return 1
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gateway.txt").write_text("\n".join(gateway) + "\n", encoding="utf-8")
    (out / "torch.txt").write_text("\n".join(torch) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
