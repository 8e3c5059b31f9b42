"""Job-end webhooks: allowlist, notify URL syntax, signing, delivery, and a real worker that retries.

Every request here goes to a real HTTP server on 127.0.0.1 (``Receiver``), and the end-to-end
tests run a real Celery worker process on the filesystem broker with a real SQLite store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from compactor.errors import InvalidSpec
from compactor.jobs import JobError, JobStatus
from compactor.queue import CeleryJobQueue, broker_folders, make_celery
from compactor.settings import Settings
from compactor.spec import parse_spec
from compactor.storage import LocalStorage
from compactor.store import open_store
from compactor.store.base import JobStore
from compactor.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    USER_AGENT,
    WebhookConfigError,
    allowed_target,
    backoff_seconds,
    deliver,
    job_document,
    parse_allowlist,
    sign,
    verify_signature,
    webhook_secrets,
)
from tests.support.jobs import (
    QUICK_SPEC,
    TENANT,
    Proc,
    child_env,
    create_job,
    start_worker,
    wait_for,
    wait_status,
    write_torchscript_model,
)
from worker.notify import NotifyOutcome, announce_job_end, deliver_job_end, retry_delay

SECRET = "default-tenant-webhook-secret-0123"
# Short so that the worker's retries take a second, not the production minutes.
BACKOFF_SECONDS = 0.4
MAX_ATTEMPTS = 3


# -- a real receiver -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.time() on arrival


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1:<free port> in a thread. Each path answers the statuses
    scripted for it in order, then ``default`` (and waits ``delays[path]`` seconds first)."""

    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    defaults: dict[str, int] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                    script = receiver.scripts.get(self.path, [])
                    status = script.pop(0) if script else receiver.defaults.get(self.path, 204)
                time.sleep(receiver.delays.get(self.path, 0.0))
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"{self.path}/moved")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


# -- allowlist -------------------------------------------------------------------------------------


def _allowed(url: str, allowlist: str) -> bool:
    try:
        allowed_target(url, parse_allowlist(allowlist))
    except InvalidSpec:
        return False
    return True


@pytest.mark.parametrize(
    "url, allowlist, expected",
    [
        ("https://hooks.example.com/compactor", "hooks.example.com", True),
        ("https://HOOKS.Example.COM/x", "hooks.example.com", True),  # host names are case-insensitive
        ("https://hooks.example.com/x", "HOOKS.EXAMPLE.COM", True),
        ("https://hooks.example.com./x", "hooks.example.com", True),  # the absolute form of the same name
        ("https://other.example.com/x", "hooks.example.com", False),
        ("https://hooks.example.com.evil.net/x", "hooks.example.com", False),
        # *.example.com: any name under it, never example.com itself or a look-alike.
        ("https://a.example.com/x", "*.example.com", True),
        ("https://a.b.example.com/x", "*.example.com", True),
        ("https://example.com/x", "*.example.com", False),
        ("https://badexample.com/x", "*.example.com", False),
        ("https://example.com.evil.net/x", "*.example.com", False),
        # A port pins the entry; without one any port matches; default ports count.
        ("https://hooks.example.com:8443/x", "hooks.example.com:8443", True),
        ("https://hooks.example.com/x", "hooks.example.com:8443", False),
        ("http://hooks.example.com:8443/x", "hooks.example.com:8443", True),
        ("https://hooks.example.com/x", "hooks.example.com:443", True),
        ("http://hooks.example.com/x", "hooks.example.com:443", False),
        ("https://hooks.example.com:9999/x", "hooks.example.com", True),
        ("https://a.example.com:8443/x", "*.example.com:8443", True),
        ("https://a.example.com:8444/x", "*.example.com:8443", False),
        # IP literals: exact, IPv6 only in brackets and compared in canonical form.
        ("http://127.0.0.1:8080/x", "127.0.0.1", True),
        ("http://127.1:8080/x", "127.0.0.1", False),  # another spelling is another host string
        ("http://2130706433/x", "127.0.0.1", False),
        ("http://[::1]:8080/x", "127.0.0.1,localhost", False),
        ("http://[::1]:8080/x", "[::1]", True),
        ("http://[0:0::1]/x", "[::1]", True),
        ("http://[::1]:8080/x", "[::1]:8080", True),
        ("http://[::1]:8081/x", "[::1]:8080", False),
        ("http://[::ffff:127.0.0.1]/x", "127.0.0.1", False),
        # The classic parser tricks: the host that counts is the one connected to, and it is evil.com.
        ("http://allowed.com@evil.com/", "allowed.com", False),
        ("http://evil.com#@allowed.com", "allowed.com", False),
        ("http://evil.com\\@allowed.com/", "allowed.com", False),
        ("http://allowed.com:80@evil.com/", "allowed.com", False),
        # Only http(s).
        ("ftp://allowed.com/x", "allowed.com", False),
        ("file:///etc/passwd", "allowed.com", False),
        # Empty allowlist: webhooks are off.
        ("https://hooks.example.com/x", "", False),
    ],
)
def test_allowlist_matches_the_host_that_is_contacted(url: str, allowlist: str, expected: bool) -> None:
    assert _allowed(url, allowlist) is expected


def test_refusals_say_what_the_operator_must_configure() -> None:
    with pytest.raises(InvalidSpec, match="not enabled.*COMPACTOR_WEBHOOK_ALLOWED_HOSTS") as disabled:
        allowed_target("https://hooks.example.com/x", ())
    assert disabled.value.field == "notify.url"
    with pytest.raises(InvalidSpec, match=r"evil\.com:443 is not on .*COMPACTOR_WEBHOOK_ALLOWED_HOSTS"):
        allowed_target("https://evil.com/x", parse_allowlist("hooks.example.com"))
    with pytest.raises(InvalidSpec, match="credentials"):
        allowed_target("http://allowed.com@evil.com/", parse_allowlist("evil.com"))


@pytest.mark.parametrize(
    "entry",
    [
        "http://hooks.example.com",
        "hooks.example.com/path",
        "*.com",
        "*",
        "ex*ample.com",
        "hooks.example.com:0",
        "hooks.example.com:99999",
        "hooks.example.com:http",
        "::1",
        "[::1",
        "[not-an-ip]",
        "[::1]8080",
        "-bad-.com",
        "127.1",
    ],
)
def test_malformed_allowlist_entries_stop_the_process_at_start_up(entry: str) -> None:
    with pytest.raises(WebhookConfigError):
        parse_allowlist(entry)
    with pytest.raises(ValidationError, match="webhook_allowed_hosts"):
        Settings(webhook_allowed_hosts=f"ok.example.com,{entry}")


# -- the notify section of the spec ------------------------------------------------------------------


def test_notify_is_optional_and_kept_in_the_full_spec() -> None:
    assert parse_spec({}).notify is None
    spec = parse_spec({"notify": {"url": "https://hooks.example.com/c?job=1"}})
    assert spec.model_dump(mode="json")["notify"] == {"url": "https://hooks.example.com/c?job=1"}


@pytest.mark.parametrize(
    "url, why",
    [
        ("file:///etc/passwd", "http and https"),
        ("gopher://hooks.example.com/", "http and https"),
        ("hooks.example.com/x", "http and https"),
        ("http://", "no host"),
        ("http://user:pw@hooks.example.com/", "credentials"),
        ("http://allowed.com@evil.com/", "credentials"),
        ("http://evil.com#@allowed.com", "fragment"),
        ("http://evil.com\\@allowed.com/", "backslash"),
        ("http://hooks.example.com/a b", "whitespace"),
        ("http://hooks.example.com/\r\nX-Injected: 1", "whitespace"),
        ("http://hooks.example.com:0/", "port"),
        ("http://hooks.example.com:70000/", "port"),
        ("http://[::1/", "IPv6"),
        ("https://hooks.example.com/" + "a" * 2048, "2048"),
    ],
)
def test_bad_notify_urls_are_refused_at_notify_url(url: str, why: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec({"notify": {"url": url}})
    [error] = info.value.errors()
    assert error["loc"] == ("notify", "url")
    assert why in str(info.value)


def test_notify_section_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec({"notify": {"url": "https://hooks.example.com/", "secret": "mine"}})
    assert [e["loc"] for e in info.value.errors()] == [("notify", "secret")]


# -- secrets and signatures --------------------------------------------------------------------------


def test_secrets_come_from_the_setting_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("# rotated monthly\nbob:bob-secret-with:colon-0123\n\n  carol : carol-secret-0123456789  # inline\n")
    settings = Settings(data_dir=tmp_path, webhook_secrets=f"default:{SECRET}", webhook_secrets_file=path)
    assert webhook_secrets(settings) == {
        "default": SECRET,
        "bob": "bob-secret-with:colon-0123",
        "carol": "carol-secret-0123456789",
    }
    with pytest.raises(ValidationError, match="too short"):
        Settings(webhook_secrets="alice:short")
    with pytest.raises(ValidationError, match="tenant:secret"):
        Settings(webhook_secrets="no-colon-here-0123456789")
    with pytest.raises(WebhookConfigError, match="SECRETS_FILE"):
        webhook_secrets(Settings(data_dir=tmp_path, webhook_secrets_file=tmp_path / "missing"))


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"job_1","status":"succeeded"}'
    header = sign(SECRET, body, 1_700_000_000)
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify_signature(SECRET, header, body, now=1_700_000_000)
    assert verify_signature(SECRET, header, body, 300, now=1_700_000_299)


@pytest.mark.parametrize(
    "header, body, secret, now",
    [
        (None, b"{}", SECRET, 1000),
        ("", b"{}", SECRET, 1000),
        ("v1=abc", b"{}", SECRET, 1000),  # no timestamp
        ("t=1000", b"{}", SECRET, 1000),  # no signature
        ("t=soon,v1=abc", b"{}", SECRET, 1000),
        (sign(SECRET, b"{}", 1000), b"{} ", SECRET, 1000),  # body changed
        (sign(SECRET, b"{}", 1000), b"{}", "another-secret-0123456789", 1000),
        (sign(SECRET, b"{}", 1000), b"{}", SECRET, 1000 + 301),  # a replay, too late
        (sign(SECRET, b"{}", 1000), b"{}", SECRET, 1000 - 301),  # from the future
        (sign(SECRET, b"{}", 1000).replace("t=1000", "t=1300"), b"{}", SECRET, 1300),  # re-dated
    ],
)
def test_verification_refuses_what_it_must(header: str | None, body: bytes, secret: str, now: float) -> None:
    assert not verify_signature(secret, header, body, 300, now=now)


def test_verification_accepts_any_of_several_signatures_while_a_secret_rotates() -> None:
    body = b"{}"
    old = sign("old-secret-0123456789", body, 1000)
    new = sign(SECRET, body, 1000)
    both = f"{old},{new.split(',')[1]}"
    assert verify_signature(SECRET, both, body, now=1000)
    assert verify_signature("old-secret-0123456789", both, body, now=1000)
    assert not verify_signature("third-secret-0123456789", both, body, now=1000)


def test_backoff_doubles_is_capped_and_jittered() -> None:
    assert [backoff_seconds(n, 2.0, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert [backoff_seconds(n, 2.0, rand=lambda: 0.0) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert backoff_seconds(20, 2.0, rand=lambda: 1.0) == 300.0
    assert backoff_seconds(20, 2.0, rand=lambda: 0.0) == 150.0
    delays = {backoff_seconds(3, 2.0) for _ in range(50)}
    assert len(delays) > 1 and all(4.0 <= d <= 8.0 for d in delays)


# -- one delivery --------------------------------------------------------------------------------------


def _deliver(receiver: Receiver, path: str, allowlist: str = "127.0.0.1", timeout: float = 5.0):
    return deliver(
        receiver.url(path),
        b'{"ok":true}',
        secret=SECRET,
        delivery_id="job_x.finished",
        allowlist=parse_allowlist(allowlist),
        timeout=timeout,
    )


def test_delivery_posts_the_signed_body_with_its_headers(receiver: Receiver) -> None:
    result = _deliver(receiver, "/unit/ok")
    assert result.delivered and result.status_code == 204
    [request] = receiver.received("/unit/ok")
    assert request.body == b'{"ok":true}'
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == USER_AGENT
    assert request.headers[EVENT_HEADER.lower()] == "job.finished"
    assert request.headers[DELIVERY_HEADER.lower()] == "job_x.finished"
    assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER.lower()], request.body)


def test_delivery_never_contacts_a_host_off_the_allowlist(receiver: Receiver) -> None:
    # The receiver is reachable, but 127.0.0.1 is not what the operator allowed.
    result = _deliver(receiver, "/unit/refused", allowlist="localhost")
    assert not result.delivered and result.refused and result.status_code is None
    assert "not on this server's webhook allowlist" in (result.error or "")
    assert receiver.received("/unit/refused") == []


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.defaults["/unit/redirect"] = 307
    result = _deliver(receiver, "/unit/redirect")
    assert not result.delivered and result.status_code == 307
    assert [r.path for r in receiver.requests if r.path.startswith("/unit/redirect")] == ["/unit/redirect"]


def test_a_slow_receiver_times_out(receiver: Receiver) -> None:
    receiver.delays["/unit/slow"] = 1.5
    started = time.monotonic()
    result = _deliver(receiver, "/unit/slow", timeout=0.3)
    assert not result.delivered and result.status_code is None
    assert "Timeout" in (result.error or "")
    assert time.monotonic() - started < 1.4


def test_an_unreachable_receiver_is_a_failed_attempt() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]
    result = deliver(f"http://127.0.0.1:{port}/", b"{}", secret=SECRET, delivery_id="d", allowlist=parse_allowlist("127.0.0.1"), timeout=2.0)
    assert not result.delivered and not result.refused and "ConnectError" in (result.error or "")


# -- one attempt of the task, in this process ------------------------------------------------------------


@pytest.fixture()
def local(tmp_path: Path) -> Iterator[tuple[Settings, JobStore, LocalStorage, Path]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        webhook_allowed_hosts="127.0.0.1",
        webhook_secrets=f"{TENANT}:{SECRET}",
        webhook_max_attempts=MAX_ATTEMPTS,
    )
    store = open_store(settings.effective_store_url)
    model = write_torchscript_model(tmp_path / "tiny.ts")
    yield settings, store, LocalStorage(settings.resolved_data_dir), model
    store.close()


def _ended_job(store: JobStore, storage: LocalStorage, model: Path, url: str | None, status: JobStatus):
    spec = dict(QUICK_SPEC, notify={"url": url}) if url else QUICK_SPEC
    job = create_job(store, storage, model, spec)
    assert store.claim(job.id, "me", 30.0) is not None
    error = JobError(code="invalid_model", message="nope") if status is JobStatus.failed else None
    finished = store.finish(job.id, "me", status, error=error)
    assert finished is not None
    return finished


def test_each_attempt_rechecks_the_worker_allowlist(local, receiver: Receiver) -> None:
    settings, store, storage, model = local
    job = _ended_job(store, storage, model, receiver.url("/task/moved-off"), JobStatus.succeeded)
    # Allowed at submission; since then the operator took 127.0.0.1 off the list.
    later = settings.model_copy(update={"webhook_allowed_hosts": "localhost"})
    assert deliver_job_end(job.id, store, later, attempt=1) is NotifyOutcome.dropped
    assert receiver.received("/task/moved-off") == []
    assert retry_delay(job.id, NotifyOutcome.dropped, 1, later) is None


def test_a_tenant_whose_secret_was_removed_gets_no_unsigned_webhook(local, receiver: Receiver) -> None:
    settings, store, storage, model = local
    job = _ended_job(store, storage, model, receiver.url("/task/no-secret"), JobStatus.failed)
    unsigned = settings.model_copy(update={"webhook_secrets": "someone-else:another-secret-0123"})
    assert deliver_job_end(job.id, store, unsigned, attempt=1) is NotifyOutcome.dropped
    assert receiver.received("/task/no-secret") == []


def test_failed_attempts_retry_until_the_last_then_log_an_error(local, receiver: Receiver, caplog) -> None:
    settings, store, storage, model = local
    receiver.defaults["/task/down"] = 503
    job = _ended_job(store, storage, model, receiver.url("/task/down"), JobStatus.failed)
    caplog.set_level(logging.INFO, logger="worker.notify")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        outcome = deliver_job_end(job.id, store, settings, attempt)
        assert outcome is NotifyOutcome.failed
        delay = retry_delay(job.id, outcome, attempt, settings)
        assert (delay is None) is (attempt == MAX_ATTEMPTS)
    assert len(receiver.received("/task/down")) == MAX_ATTEMPTS
    assert f"job {job.id}: webhook attempt 1 failed: answered 503" in caplog.text
    assert [r.levelname for r in caplog.records if "giving up" in r.message] == ["ERROR"]
    payload = json.loads(receiver.received("/task/down")[0].body)
    assert payload == job_document(job) and payload["error"] == {"code": "invalid_model", "message": "nope"}


def test_a_deleted_job_or_one_without_notify_sends_nothing(local) -> None:
    settings, store, storage, model = local
    plain = _ended_job(store, storage, model, None, JobStatus.succeeded)
    assert deliver_job_end(plain.id, store, settings, 1) is NotifyOutcome.dropped
    assert deliver_job_end("job_gone", store, settings, 1) is NotifyOutcome.dropped


def test_announcing_enqueues_only_for_a_finished_job_that_asked(local, receiver: Receiver) -> None:
    settings, store, storage, model = local
    app = make_celery(settings)
    messages = broker_folders(settings)["messages"]
    try:
        plain = _ended_job(store, storage, model, None, JobStatus.succeeded)
        assert announce_job_end(app, settings, store, plain.id) is False
        queued = create_job(store, storage, model, dict(QUICK_SPEC, notify={"url": receiver.url("/x")}))
        assert announce_job_end(app, settings, store, queued.id) is False  # not finished
        assert list(messages.glob("*.msg")) == []
        wanted = _ended_job(store, storage, model, receiver.url("/x"), JobStatus.cancelled)
        assert announce_job_end(app, settings, store, wanted.id) is True
        [message] = messages.glob("*.msg")
        headers = json.loads(message.read_text())["headers"]
        assert headers["task"] == "compactor.notify_job" and headers["id"] == f"{wanted.id}-notify"
    finally:
        app.close()


# -- a real worker -------------------------------------------------------------------------------------


@dataclass
class WorkerEnv:
    store: JobStore
    storage: LocalStorage
    queue: CeleryJobQueue
    worker: Proc
    notifier: Proc
    model: Path
    garbage: Path


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerEnv]:
    root = tmp_path_factory.mktemp("webhooks")
    settings = Settings(data_dir=root / "data")
    store = open_store(settings.effective_store_url)
    queue = CeleryJobQueue(settings)
    garbage = root / "garbage.ts"
    garbage.write_bytes(b"GIF89a not a model" * 8)
    webhook_env = dict(
        COMPACTOR_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        COMPACTOR_WEBHOOK_SECRETS=f"{TENANT}:{SECRET}",
        COMPACTOR_WEBHOOK_BACKOFF_SECONDS=str(BACKOFF_SECONDS),
        COMPACTOR_WEBHOOK_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        COMPACTOR_WEBHOOK_TIMEOUT_SECONDS="5",
    )
    worker = start_worker(root / "data", root / "worker.log", **webhook_env)
    # Webhooks go to their own queue and consumer (`compactor notifier`), never behind a job.
    notifier = Proc(
        [sys.executable, "-m", "launcher.cli", "notifier", "--name", "notifier@%h"],
        child_env(root / "data", **webhook_env),
        root / "notifier.log",
    )
    notifier.wait_log(" ready.", timeout=30)
    try:
        yield WorkerEnv(
            store,
            LocalStorage(settings.resolved_data_dir),
            queue,
            worker,
            notifier,
            write_torchscript_model(root / "tiny.ts"),
            garbage,
        )
    finally:
        codes = (worker.terminate(), notifier.terminate())
        queue.close()
        store.close()
        assert codes == (0, 0), worker.log()[-3000:] + notifier.log()[-3000:]
        # The notifier never loads the compression core.
        assert "compression core loaded" not in notifier.log()


def test_worker_retries_the_webhook_and_the_receiver_verifies_it(worker_env: WorkerEnv, receiver: Receiver) -> None:
    env = worker_env
    path = "/e2e/flaky"
    receiver.scripts[path] = [500]  # the first delivery fails; the second is accepted (204)
    job = create_job(env.store, env.storage, env.model, dict(QUICK_SPEC, notify={"url": receiver.url(path)}))
    env.queue.enqueue(job.id, 1)

    done = wait_status(env.store, job.id, {JobStatus.succeeded, JobStatus.failed}, 90)
    assert done.status is JobStatus.succeeded, done.error
    first, second = wait_for(lambda: receiver.received(path)[:2] if len(receiver.received(path)) >= 2 else None, 30, "two deliveries")
    env.notifier.wait_log(f"job {job.id}: webhook attempt 2 delivered (204)", timeout=10)

    # The job's outcome was recorded before the first attempt; the retry came after the backoff.
    assert done.finished_at is not None and done.finished_at.timestamp() <= first.at
    assert second.at - first.at >= BACKOFF_SECONDS / 2 * 0.9
    assert first.headers[DELIVERY_HEADER.lower()] == second.headers[DELIVERY_HEADER.lower()] == f"{job.id}.finished"
    for request in (first, second):
        assert request.headers[EVENT_HEADER.lower()] == "job.finished"
        assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER.lower()], request.body)
        assert not verify_signature("a-guessed-secret-0123456789", request.headers[SIGNATURE_HEADER.lower()], request.body)
        payload = json.loads(request.body)
        assert payload["id"] == job.id and payload["status"] == "succeeded"
        assert payload == job_document(done)  # the job document as GET /v1/jobs/{id} shows it
        assert {a["name"] for a in payload["artifacts"]} >= {"model.ts", "report.json"}
    log_text = env.notifier.log()
    assert f"job {job.id}: webhook attempt 1 failed: answered 500" in log_text
    assert len(receiver.received(path)) == 2


def test_worker_announces_a_failed_job_and_gives_up_on_a_dead_receiver(worker_env: WorkerEnv, receiver: Receiver) -> None:
    env = worker_env
    path = "/e2e/down"
    receiver.defaults[path] = 503
    job = create_job(env.store, env.storage, env.garbage, dict(QUICK_SPEC, notify={"url": receiver.url(path)}))
    env.queue.enqueue(job.id, 1)

    done = wait_status(env.store, job.id, {JobStatus.succeeded, JobStatus.failed}, 60)
    assert done.status is JobStatus.failed and done.error is not None
    env.notifier.wait_log(f"job {job.id}: webhook undelivered after {MAX_ATTEMPTS} attempt(s); giving up", timeout=30)
    deliveries = receiver.received(path)
    assert len(deliveries) == MAX_ATTEMPTS
    assert len({r.headers[DELIVERY_HEADER.lower()] for r in deliveries}) == 1
    payload = json.loads(deliveries[-1].body)
    assert payload["status"] == "failed" and payload["error"]["code"] == done.error.code
    assert verify_signature(SECRET, deliveries[-1].headers[SIGNATURE_HEADER.lower()], deliveries[-1].body)
