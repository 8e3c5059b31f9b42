"""kombu's ``filesystem://`` transport with messages that appear only once complete.

kombu 5's ``Channel._put`` opens ``<time>_<uuid>.<queue>.msg`` in the queue folder and then
writes it; ``_get`` lists that folder, moves the first matching file away and parses it, with no
lock. A consumer that polls between the open and the write gets an empty file: ``loads`` raises,
the worker dies with "Unrecoverable error: JSONDecodeError", and the message — already moved and
deleted — is lost. Seen in CI when a worker's own reaper re-queued a job while its consumer
polled every 0.1 s: the job never ran again. Here the message is written under a name ``_get``
ignores and renamed into place, which is atomic within one folder.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

# The dotted path Celery's ``broker_transport`` takes (it wins over the URL's scheme).
TRANSPORT_PATH = "compactor.fs_broker:Transport"


def message_name(queue: str) -> str:
    """kombu's own naming: sorted by time, matched by the ``.<queue>.msg`` suffix."""
    return f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"


class Channel(filesystem.Channel):
    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]  # kombu passes **kwargs (base.py:624)
        final = os.path.join(self.data_folder_out, message_name(queue))
        # A leading dot: ``_get`` matches ``name.partition('.')[2]`` against "<queue>.msg", which
        # "<…>.msg.part" after the dot never equals.
        partial = os.path.join(self.data_folder_out, "." + os.path.basename(final) + ".part")
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(message)))  # type: ignore[no-untyped-call]
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
