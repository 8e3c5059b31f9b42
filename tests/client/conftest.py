"""Fixtures of the client tests: a live gateway without a worker, and the files to send it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compactor.settings import Settings
from tests.support.gateway import Files
from tests.support.live_server import Inputs, Server, running_server, write_inputs


@pytest.fixture()
def server(make_settings: Callable[..., Settings]) -> Iterator[Server]:
    with running_server(make_settings()) as running:
        yield running


@pytest.fixture()
def inputs(tmp_path: Path, files: Files) -> Inputs:
    return write_inputs(tmp_path, files)
