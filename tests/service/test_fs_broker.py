"""The embedded broker's messages appear to consumers only once written in full (compactor/fs_broker.py)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from queue import Empty
from typing import Any

import kombu
from kombu.transport import virtual

from compactor import fs_broker
from compactor.queue import CeleryJobQueue, celery_config
from compactor.settings import Settings


def _channel(folder: Path, transport: str = fs_broker.TRANSPORT_PATH) -> virtual.Channel:
    connection = kombu.Connection(
        "filesystem://",
        transport=transport,
        transport_options={"data_folder_in": str(folder), "data_folder_out": str(folder), "store_processed": False},
    )
    return connection.default_channel


def test_a_message_is_invisible_until_it_is_complete(tmp_path: Path, monkeypatch: Any) -> None:
    channel = _channel(tmp_path)
    payload = {"body": "x" * 1_000_000, "headers": {"id": "job_1-1"}}
    polled_before_rename: list[Any] = []
    real_replace = os.replace

    def poll_then_replace(source: str, target: str) -> None:
        # The bytes are written but not yet renamed: a consumer polling now must find nothing.
        assert Path(source).stat().st_size > 1_000_000
        try:
            polled_before_rename.append(channel._get("jobs"))
        except Empty:
            polled_before_rename.append(None)
        real_replace(source, target)

    monkeypatch.setattr(fs_broker.os, "replace", poll_then_replace)
    channel._put("jobs", payload)
    assert polled_before_rename == [None]
    assert channel._get("jobs") == payload
    assert os.listdir(tmp_path) == []


def _produce(folder: str, count: int, transport: str) -> None:
    channel = _channel(Path(folder), transport)
    for number in range(count):
        channel._put("jobs", {"body": "y" * 200_000, "number": number})


def consume_while_producing(folder: Path, transport: str, count: int = 200) -> list[int]:
    """Poll ``folder`` while another process puts ``count`` messages through ``transport``."""
    producer = multiprocessing.get_context("spawn").Process(target=_produce, args=(str(folder), count, transport))
    producer.start()
    channel = _channel(folder)
    received: list[int] = []
    try:
        while len(received) < count:
            try:
                received.append(channel._get("jobs")["number"])
            except Empty:
                assert producer.is_alive() or os.listdir(folder), f"the producer ended and {count - len(received)} messages never came"
    finally:
        producer.join(30)
    return received


def test_a_consumer_polling_while_a_producer_writes_gets_every_message_whole(tmp_path: Path) -> None:
    # kombu's own transport ("kombu.transport.filesystem:Transport") fails this every time here:
    # its _put opens the .msg file before writing it, a poll in between reads an empty file,
    # raises JSONDecodeError in the worker and loses the message.
    assert sorted(consume_while_producing(tmp_path, fs_broker.TRANSPORT_PATH)) == list(range(200))


def test_the_embedded_queue_uses_the_atomic_transport(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert celery_config(settings)["broker_transport"] == fs_broker.TRANSPORT_PATH
    queue = CeleryJobQueue(settings)
    with queue.app.connection_for_write() as connection:
        assert isinstance(connection.transport, fs_broker.Transport)
    # Redis (or any other broker) keeps its own transport.
    assert "broker_transport" not in celery_config(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
