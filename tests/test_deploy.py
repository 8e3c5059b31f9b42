"""The deployment files (Dockerfile, .dockerignore, docker-compose.yml, deploy/) agree with the code.

Offline: nothing here builds an image or starts a container. The compose file is read with
PyYAML (``${VAR:-default}`` resolved to its default, as on a host that sets nothing) and, where
Debian's ``docker-compose`` (1.29) is on PATH, also validated and resolved by it. CI installs it
and sets ``COMPACTOR_REQUIRE_COMPOSE=1``, which turns that skip into a failure.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from compactor.settings import Settings
from launcher.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "compactor.env.example"
REQUIREMENTS_SCRIPT = ROOT / "deploy" / "requirements.py"

COMPACTOR_SERVICES = ("gateway", "worker-gpu", "worker-cpu")
WORKERS = ("worker-gpu", "worker-cpu")
# Distribution name → import name, for every package the gateway image leaves out.
TORCH_STACK_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "torch-pruning": "torch_pruning",
    "timm": "timm",
    "safetensors": "safetensors",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
}
ENV_PREFIX = "COMPACTOR_"


# -- readers -------------------------------------------------------------------------------------


def _interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, resolved as if no variable were set."""
    if isinstance(value, str):

        def default(match: re.Match[str]) -> str:
            return match.group(3) or ""

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-)?([^}]*)\}", default, value).replace("$$", "$")
    if isinstance(value, list):
        return [_interpolate(item) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate(item) for key, item in value.items()}
    return value


def _compose() -> dict[str, Any]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def _parse_env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines; with ``commented``, also the ``# KEY=VALUE`` examples."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if commented:
            line = re.sub(r"^#\s*(?=[A-Z][A-Z0-9_]*=)", "", line)
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def _env_files(service: dict[str, Any]) -> list[Path]:
    env_file = service.get("env_file", [])
    return [ROOT / name for name in ([env_file] if isinstance(env_file, str) else env_file)]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """What the container gets: its env files, then ``environment`` (which wins), as compose does."""
    env: dict[str, str] = {}
    for path in _env_files(service):
        env.update(_parse_env_file(path))
    declared = service.get("environment", {})
    if isinstance(declared, list):
        declared = dict(item.partition("=")[::2] for item in declared)
    env.update({key: "" if value is None else str(value) for key, value in declared.items()})
    return env


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _parse_cli(command: list[str]) -> Any:
    assert command[0] == "compactor", f"{command} does not run the compactor command"
    return build_parser().parse_args(command[1:])


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: dict[str, Stage]  # in file order; the last one is the default target

    @property
    def default_target(self) -> str:
        return list(self.stages)[-1]

    def chain(self, target: str) -> list[Stage]:
        """The target and the stages it is built FROM, base first."""
        stages: list[Stage] = []
        name: str | None = target
        while name in self.stages:
            stages.insert(0, self.stages[name])
            name = self.stages[name].base
        return stages

    def effective(self, target: str, instruction: str) -> list[str]:
        """Every ``instruction`` that shapes ``target``'s image config, inherited ones first."""
        return [args for stage in self.chain(target) for instr, args in stage.instructions if instr == instruction]

    def last(self, target: str, instruction: str) -> str:
        values = self.effective(target, instruction)
        assert values, f"target {target!r} has no {instruction}"
        return values[-1]

    def env(self, target: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.effective(target, "ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
        return env


def _dockerfile() -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and the syntax directive) are dropped, also inside continuations
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"

    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "FROM":
            words = [word for word in rest.split() if not word.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = Stage(name, image)
        elif current is None:
            assert instr == "ARG", f"{instr} before the first FROM"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            current.instructions.append((instr, rest))
    return Dockerfile(args, stages)


def _healthcheck_url(dockerfile: Dockerfile, target: str) -> str:
    healthcheck = dockerfile.last(target, "HEALTHCHECK")
    _, _, command = healthcheck.partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"], f"the HEALTHCHECK must use Python (no curl in slim images): {argv}"
    urls = re.findall(r"https?://[^'\"\s]+", argv[2])
    assert len(urls) == 1, argv
    return urls[0]


def _requirements_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_requirements", REQUIREMENTS_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compactor_variables_set() -> dict[str, set[str]]:
    """Every COMPACTOR_* variable the deployment files set (or show as an example) → where."""
    found: dict[str, set[str]] = {}
    compose = _compose()
    for name, service in compose["services"].items():
        for key in _environment(service):
            found.setdefault(key, set()).add(f"docker-compose.yml:{name}")
    dockerfile = _dockerfile()
    for stage in dockerfile.stages:
        for key in dockerfile.env(stage):
            found.setdefault(key, set()).add(f"Dockerfile:{stage}")
    for key in _parse_env_file(ENV_EXAMPLE, commented=True):
        found.setdefault(key, set()).add(ENV_EXAMPLE.name)
    return {key: where for key, where in found.items() if key.startswith(ENV_PREFIX)}


# -- settings --------------------------------------------------------------------------------------


def test_every_compactor_variable_is_a_settings_field() -> None:
    assert Settings.model_config.get("env_prefix") == ENV_PREFIX
    variables = _compactor_variables_set()
    assert {"COMPACTOR_DATA_DIR", "COMPACTOR_BROKER_URL", "COMPACTOR_STORE_URL", "COMPACTOR_API_KEYS"} <= set(variables)
    unknown = {key: sorted(where) for key, where in variables.items() if key[len(ENV_PREFIX) :].lower() not in Settings.model_fields}
    assert not unknown, f"COMPACTOR_* variables that compactor.settings.Settings does not read: {unknown}"


@pytest.mark.parametrize("name", COMPACTOR_SERVICES)
def test_each_service_environment_makes_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    env = _environment(_compose()["services"][name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a value of the wrong type
    assert settings.effective_broker_url.startswith("redis://")
    assert settings.effective_store_url.startswith("redis://")


def test_env_example_ships_no_api_key_and_the_gateway_then_refuses_to_listen() -> None:
    from service.auth import check_bind_allowed

    example = _parse_env_file(ENV_EXAMPLE)
    assert example.get("COMPACTOR_API_KEYS", "") == "", "the committed example must not carry a key"
    assert "COMPACTOR_INSECURE" not in example, "insecure mode must stay commented out in the example"
    settings = Settings(**{key[len(ENV_PREFIX) :].lower(): value for key, value in example.items()}, host="0.0.0.0")
    with pytest.raises(RuntimeError, match="no API keys"):
        check_bind_allowed(settings)


def test_compose_env_file_exists_without_any_variable_set() -> None:
    # docker-compose fails on a missing env_file: the default must be the committed example.
    for name in COMPACTOR_SERVICES:
        files = _env_files(_compose()["services"][name])
        assert files, f"{name} reads no env file"
        for path in files:
            assert path.is_file(), f"{name}: env_file {path} does not exist"
    raw = COMPOSE.read_text(encoding="utf-8")
    assert "deploy/compactor.env.example" in raw and "DEPLOY_ENV_FILE" in ENV_EXAMPLE.read_text(encoding="utf-8")


# -- ports, data, broker ---------------------------------------------------------------------------


def test_gateway_port_agrees_everywhere() -> None:
    compose = _compose()
    gateway = compose["services"]["gateway"]
    args = _parse_cli(_command(gateway))
    assert args.command == "gateway" and args.host == "0.0.0.0"
    published = [str(port) for port in gateway["ports"]]
    assert len(published) == 1
    container_port = int(published[0].rsplit(":", 1)[-1].split("/")[0])
    dockerfile = _dockerfile()
    image_args = _parse_cli(json.loads(dockerfile.last(dockerfile.default_target, "CMD")))
    exposed = {int(port.split("/")[0]) for target in dockerfile.stages for ports in dockerfile.effective(target, "EXPOSE") for port in ports.split()}
    health = urlparse(_healthcheck_url(dockerfile, "gateway"))
    assert image_args.command == "gateway" and image_args.host == "0.0.0.0"
    assert {args.port, container_port, image_args.port, health.port} == exposed == {8000}


def test_data_dir_is_the_shared_volume_everywhere() -> None:
    compose = _compose()
    dockerfile = _dockerfile()
    for target in ("gateway", dockerfile.default_target):
        data_dir = dockerfile.env(target)["COMPACTOR_DATA_DIR"]
        volumes = [path for args in dockerfile.effective(target, "VOLUME") for path in json.loads(args)]
        assert volumes == [data_dir], f"{target}: VOLUME {volumes} vs COMPACTOR_DATA_DIR={data_dir}"
    assert "artifacts" in compose["volumes"]
    for name in COMPACTOR_SERVICES:
        service = compose["services"][name]
        data_dir = _environment(service)["COMPACTOR_DATA_DIR"]
        assert data_dir == dockerfile.env(dockerfile.default_target)["COMPACTOR_DATA_DIR"]
        assert f"artifacts:{data_dir}" in service["volumes"], f"{name} does not mount the artifacts volume at {data_dir}"


def test_broker_and_store_point_at_the_compose_redis() -> None:
    compose = _compose()
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:")
    command = " ".join(_command(redis))
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    named = [str(volume).split(":")[0] for volume in redis["volumes"]]
    assert any(name in compose["volumes"] for name in named), "Redis data needs a named volume"
    for name in COMPACTOR_SERVICES:
        service = compose["services"][name]
        env = _environment(service)
        for key in ("COMPACTOR_BROKER_URL", "COMPACTOR_STORE_URL"):
            url = urlparse(env[key])
            assert url.scheme == "redis" and url.hostname == "redis", f"{name}: {key}={env[key]}"
            assert (url.port or 6379) == 6379, f"{name}: {key}={env[key]}"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


# -- workers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKERS)
def test_worker_commands_are_valid_compactor_commands(name: str) -> None:
    service = _compose()["services"][name]
    args = _parse_cli(_command(service))
    assert args.command == "worker"
    assert args.concurrency == 1
    if name == "worker-gpu":
        assert args.gpu == 0, "inside the container the one reserved GPU is device 0"
        assert service["profiles"] == ["gpu"]
    else:
        assert args.gpu is None
        assert service["profiles"] == ["cpu"]
        assert "deploy" not in service
    # The image's HEALTHCHECK probes the gateway's port: a worker must bring its own.
    assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL", "NONE"} or service["healthcheck"].get("disable")
    assert "8000" not in " ".join(service["healthcheck"].get("test", []))


def test_gpu_worker_reserves_a_gpu() -> None:
    service = _compose()["services"]["worker-gpu"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    gpus = [device for device in devices if device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])]
    assert len(gpus) == 1
    count = gpus[0].get("count", len(gpus[0].get("device_ids", [])))
    assert count == 1, "one worker process per GPU"


def test_images_match_dockerfile_targets() -> None:
    compose = _compose()
    dockerfile = _dockerfile()
    assert compose["services"]["gateway"]["build"].get("target") == "gateway"
    for name in WORKERS:
        target = compose["services"][name]["build"].get("target", dockerfile.default_target)
        assert target == dockerfile.default_target, f"{name} must run the full image (torch)"
    assert "gateway" in dockerfile.stages


# -- Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile_builds_lean_non_root_images() -> None:
    dockerfile = _dockerfile()
    assert re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?", dockerfile.args.get("PYTHON_IMAGE", "")), dockerfile.args
    for target in ("gateway", dockerfile.default_target):
        chain = dockerfile.chain(target)
        assert chain[0].base == dockerfile.args["PYTHON_IMAGE"]
        user = dockerfile.last(target, "USER").split(":")[0]
        assert user not in {"root", "0"}, f"{target} runs as root"
        for stage in chain:
            for instr, args in stage.instructions:
                # Final images: no compilers, no package installs; only the builders' venv comes in.
                if instr == "RUN":
                    assert "pip install" not in args and "apt-get install" not in args, f"{target}/{stage.name}: {args}"
                if instr == "COPY":
                    assert args.startswith("--from=build-") and args.endswith(" /opt/venv /opt/venv"), f"{target}: {args}"
    # Multi-stage: the two final targets take their venv from different builders.
    gateway_from = dockerfile.last("gateway", "COPY").split()[0]
    full_from = dockerfile.last(dockerfile.default_target, "COPY").split()[0]
    assert gateway_from != full_from
    assert any(s.name == "deps-gateway" for s in dockerfile.chain(gateway_from.split("=", 1)[1]))
    assert any(s.name == "deps-full" for s in dockerfile.chain(full_from.split("=", 1)[1]))
    assert "PIP_NO_CACHE_DIR" in dockerfile.env("gateway")


def test_dockerignore_allows_exactly_what_the_dockerfile_copies() -> None:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: secrets and the local venv must never reach the build context"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied: set[str] = set()
    for stage in _dockerfile().stages.values():
        for instr, args in stage.instructions:
            if instr == "COPY" and not args.startswith("--from"):
                copied.update(shlex.split(args)[:-1])
    assert copied == allowed, f"COPY sources {sorted(copied)} vs .dockerignore allow-list {sorted(allowed)}"
    assert not any("compactor.env" in name and not name.endswith(".example") for name in allowed)
    for name in copied:
        assert (ROOT / name).exists(), name


def test_dockerfile_pins_the_torch_pair_from_pyproject() -> None:
    module = _requirements_module()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    dependencies = [*pyproject["project"]["dependencies"], *pyproject["project"]["optional-dependencies"]["service"]]
    gateway, torch = module.split(ROOT / "pyproject.toml")
    assert sorted(gateway + torch) == sorted(dependencies)
    assert "torch==2.14.1" in torch and "torchvision==0.29.1" in torch
    assert {module.requirement_name(req) for req in torch} == set(module.TORCH_STACK) == set(TORCH_STACK_MODULES)
    assert pyproject["project"]["scripts"]["compactor"] == "launcher.cli:main"


# -- the gateway image really is torch-free ----------------------------------------------------------


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):  # function-local (lazy) imports too
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_gateway_code_never_imports_the_torch_stack() -> None:
    left_out = set(TORCH_STACK_MODULES.values())
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_modules(path) & left_out)
        for package in ("compactor", "service")
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imported_modules(path) & left_out
    }
    assert not offenders, f"the gateway image has no torch stack, yet these import it: {offenders}"


def test_gateway_starts_and_answers_healthz_with_the_torch_stack_unimportable(tmp_path: Path) -> None:
    dockerfile = _dockerfile()
    health_path = urlparse(_healthcheck_url(dockerfile, "gateway")).path
    script = textwrap.dedent(
        f"""
        import sys

        BLOCKED = {sorted(TORCH_STACK_MODULES.values())!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not in the gateway image)", name=name)
                return None

        sys.meta_path.insert(0, Block())

        from launcher.cli import build_parser
        from compactor.settings import Settings
        from fastapi.testclient import TestClient
        from service.app import create_app

        build_parser().parse_args(["gateway", "--host", "0.0.0.0", "--port", "8000"])
        app = create_app(Settings(data_dir={str(tmp_path)!r}))
        # The OpenAPI document lists every route (app.routes holds included routers unexpanded).
        paths = app.openapi()["paths"]
        assert "get" in paths.get({health_path!r}, {{}}), sorted(paths)
        with TestClient(app) as client:
            response = client.get({health_path!r})
        assert response.status_code == 200, response.text
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# -- docker-compose itself ---------------------------------------------------------------------------


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("COMPACTOR_REQUIRE_COMPOSE") == "1":
            pytest.fail("COMPACTOR_REQUIRE_COMPOSE=1 but docker-compose is not on PATH (apt-get install docker-compose)")
        pytest.skip("docker-compose is not installed (CI installs it and sets COMPACTOR_REQUIRE_COMPOSE=1)")
    return binary


def _run_compose(*args: str) -> subprocess.CompletedProcess[str]:
    # As on a host that sets nothing: no DEPLOY_ENV_FILE, no COMPOSE_* overrides.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEPLOY_", "COMPOSE_", "COMPACTOR_"))}
    return subprocess.run(
        [_docker_compose(), "--project-directory", str(ROOT), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_config_is_valid() -> None:
    result = _run_compose("config", "-q")
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_resolves_what_these_tests_read() -> None:
    result = _run_compose("config")
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout)
    ours = _compose()
    assert set(resolved["services"]) == set(ours["services"])
    for name in COMPACTOR_SERVICES:
        environment = resolved["services"][name]["environment"]
        theirs = {key: "" if value is None else str(value) for key, value in environment.items()}
        assert theirs == _environment(ours["services"][name]), name
        assert [str(part) for part in resolved["services"][name]["command"]] == _command(ours["services"][name])
