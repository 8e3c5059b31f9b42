"""Fixtures every test directory may use; tests/conftest.py registers this module as a plugin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from compactor.settings import Settings
from tests.support.gateway import Files, gateway_settings, make_files


@pytest.fixture(scope="session")
def files() -> Files:
    return make_files()


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        return gateway_settings(tmp_path / "data", **overrides)

    return make


@pytest.fixture()
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()
