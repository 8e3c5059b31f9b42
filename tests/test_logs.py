"""JSON-lines logs carry the running job's id, tenant and stage on every line, from any thread."""

from __future__ import annotations

import io
import json
import logging
import threading

from compactor.logs import JobContextFilter, JsonLineFormatter, job_context


def _capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger("test.logs")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_job_fields_on_every_line_while_the_job_runs() -> None:
    logger, stream = _capture()
    logger.info("before any job")
    with job_context.job("job_abc", "acme"):
        logger.info("claimed")
        job_context.set_stage("finetune")
        # The heartbeat thread logs too: same fields.
        thread = threading.Thread(target=lambda: logger.warning("heartbeat %d", 3))
        thread.start()
        thread.join()
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    logger.info("after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["before any job", "claimed", "heartbeat 3", "failed", "after"]
    assert "job_id" not in lines[0] and "job_id" not in lines[-1]
    assert lines[1] == {**lines[1], "job_id": "job_abc", "tenant": "acme", "level": "info", "logger": "test.logs"}
    assert "stage" not in lines[1]
    assert lines[2]["stage"] == "finetune" and lines[2]["job_id"] == "job_abc" and lines[2]["level"] == "warning"
    assert "ValueError: boom" in lines[3]["exc_info"]
    assert lines[0]["ts"].endswith("Z") and isinstance(lines[0]["pid"], int)
