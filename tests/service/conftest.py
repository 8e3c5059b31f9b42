"""Fixtures for the gateway tests: a real app on a tmp data dir (SQLite store, LocalStorage,
Celery's filesystem broker); the upload files and settings are tests/support/fixtures.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from compactor.settings import Settings
from service.app import create_app


@pytest.fixture()
def app(settings: Settings) -> Any:
    return create_app(settings)


@pytest.fixture()
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c
    app.state.resources.close()
