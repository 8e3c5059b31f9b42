"""Signed job-end webhooks (``spec.notify.url``): allowlist, payload, signature, delivery.

Torch-free and shared: the gateway refuses a notify URL at submission with the same
allowlist and secret lookup that the worker re-checks before every delivery attempt.

SSRF guard. The operator names the hosts webhooks may reach
(``COMPACTOR_WEBHOOK_ALLOWED_HOSTS``); nothing else is ever contacted. Entries are
exact host names (case-insensitive), ``*.example.com`` suffix patterns (any name
*under* example.com, not example.com itself), IP literals (IPv6 in brackets:
``[::1]``), each optionally pinned to a port (``hooks.example.com:8443``). The host
that is checked is the one httpx connects to: the URL is parsed once, by httpx, and
that parsed URL is what the request is sent to. Redirects are never followed and
only ``http``/``https`` is spoken. An allowlisted *name* is trusted by the operator,
including whatever addresses it resolves to.

Signature (Stripe-style, so receivers can reject replays)::

    Compactor-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}." + raw body)>

keyed by the job's tenant's secret (``COMPACTOR_WEBHOOK_SECRETS``); ``verify_signature``
is the receiver's side of it. The body is the job document exactly as
``GET /v1/jobs/{id}`` shows it; ``Compactor-Delivery`` is the same on every retry of
one job end, so a receiver can drop duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from compactor.documents import JobOut, job_json
from compactor.errors import InvalidSpec
from compactor.jobs import Job

if TYPE_CHECKING:
    from compactor.settings import Settings

log = logging.getLogger(__name__)

EVENT_JOB_FINISHED = "job.finished"
SIGNATURE_HEADER = "Compactor-Signature"
EVENT_HEADER = "Compactor-Event"
DELIVERY_HEADER = "Compactor-Delivery"
USER_AGENT = "compactor-webhook/0.1"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300.0
# Retry delays double from webhook_backoff_seconds up to this cap.
MAX_BACKOFF_SECONDS = 300.0
# A weak secret makes signatures forgeable; 16 characters is the floor, 32 random bytes the advice.
MIN_SECRET_LENGTH = 16

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
NOTIFY_FIELD = "notify.url"


class WebhookConfigError(ValueError):
    """The operator's webhook configuration cannot be read or parsed."""


# -- allowlist ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowedHost:
    """One allowlist entry: an exact host or a ``*.suffix`` pattern, optionally pinned to a port."""

    host: str  # lower-case ASCII name, or a normalized IP literal (IPv6 without brackets)
    wildcard: bool = False  # True: ``host`` is a suffix; any name strictly under it matches
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host) and _is_dns_name(host)
        return host == self.host


@dataclass(frozen=True)
class WebhookTarget:
    """A notify URL as httpx parsed it: the request goes to ``url``; ``host``/``port`` were checked."""

    url: httpx.URL
    host: str
    port: int


def _is_dns_name(host: str) -> bool:
    labels = host.split(".")
    return len(host) <= 253 and all(_LABEL_RE.match(label) for label in labels) and not labels[-1].isdigit()


def _normalize_ip(text: str) -> str | None:
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return None


def _normalize_host(host: str) -> str:
    """Lower case, one trailing dot dropped (``a.com.`` is ``a.com``), IP literals in canonical form."""
    host = host.lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    return _normalize_ip(host) or host


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise WebhookConfigError(f"webhook allowlist entry {entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def _parse_entry(entry: str) -> AllowedHost:
    raw = entry.strip().lower()
    port: int | None = None
    if "/" in raw or "@" in raw:
        raise WebhookConfigError(f"webhook allowlist entry {entry!r}: write a host (optionally host:port), not a URL")
    if raw.startswith("["):  # [v6] or [v6]:port
        close = raw.find("]")
        if close < 0:
            raise WebhookConfigError(f"webhook allowlist entry {entry!r}: missing ']'")
        rest = raw[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise WebhookConfigError(f"webhook allowlist entry {entry!r}: expected ':port' after ']'")
            port = _parse_port(rest[1:], entry)
        address = _normalize_ip(raw[1:close])
        if address is None or ":" not in address:
            raise WebhookConfigError(f"webhook allowlist entry {entry!r}: not an IPv6 address")
        return AllowedHost(address, port=port)
    if raw.count(":") > 1:
        raise WebhookConfigError(f"webhook allowlist entry {entry!r}: write IPv6 addresses in brackets, e.g. [::1]:8080")
    name, sep, port_text = raw.partition(":")
    if sep:
        port = _parse_port(port_text, entry)
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    name = _normalize_host(name)
    if not wildcard and _normalize_ip(name) is not None:
        return AllowedHost(name, port=port)
    if not _is_dns_name(name):
        raise WebhookConfigError(
            f"webhook allowlist entry {entry!r}: expected a host name, '*.domain', an IP address or [IPv6], "
            "optionally with ':port' (non-ASCII names in punycode)"
        )
    if wildcard and "." not in name:
        # '*.com' would hand the whole top-level domain to anyone who registers a name in it.
        raise WebhookConfigError(f"webhook allowlist entry {entry!r}: a wildcard needs at least two labels after '*.'")
    return AllowedHost(name, wildcard=wildcard, port=port)


def parse_allowlist(text: str) -> tuple[AllowedHost, ...]:
    """``COMPACTOR_WEBHOOK_ALLOWED_HOSTS``: entries separated by commas or whitespace."""
    return tuple(_parse_entry(item) for item in re.split(r"[,\s]+", text) if item.strip())


def parse_target(url: str) -> WebhookTarget:
    """Parse ``url`` the way the delivery will (httpx); raises ``InvalidSpec`` for what cannot be sent.

    ``NotifySpec`` already refused userinfo, fragments, backslashes and other schemes; this
    repeats the checks that matter on httpx's own parse, so a difference between two URL
    parsers can never let a request go to a host other than the one checked."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidSpec(f"the notify URL cannot be parsed: {exc}", field=NOTIFY_FIELD) from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise InvalidSpec("the notify URL must use http or https", field=NOTIFY_FIELD)
    if parsed.userinfo:
        raise InvalidSpec("the notify URL must not carry credentials (user:password@)", field=NOTIFY_FIELD)
    try:
        host = parsed.raw_host.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidSpec("the notify URL's host cannot be encoded", field=NOTIFY_FIELD) from None
    if not host:
        raise InvalidSpec("the notify URL has no host", field=NOTIFY_FIELD)
    port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
    return WebhookTarget(url=parsed, host=_normalize_host(host), port=port)


def host_allowed(target: WebhookTarget, allowlist: Iterable[AllowedHost]) -> bool:
    return any(entry.matches(target.host, target.port) for entry in allowlist)


def allowed_target(url: str, allowlist: Iterable[AllowedHost]) -> WebhookTarget:
    """The parsed target when its host is on the allowlist; raises ``InvalidSpec`` saying why not."""
    entries = tuple(allowlist)
    if not entries:
        raise InvalidSpec(
            "webhooks are not enabled on this server: the operator must list the receiver's host in COMPACTOR_WEBHOOK_ALLOWED_HOSTS",
            field=NOTIFY_FIELD,
        )
    target = parse_target(url)
    if not host_allowed(target, entries):
        shown = f"[{target.host}]" if ":" in target.host else target.host
        raise InvalidSpec(
            f"the host {shown}:{target.port} is not on this server's webhook allowlist: the operator must add it to COMPACTOR_WEBHOOK_ALLOWED_HOSTS",
            field=NOTIFY_FIELD,
        )
    return target


# -- secrets -----------------------------------------------------------------------------------------


def parse_secret_pairs(items: Iterable[str], source: str) -> dict[str, str]:
    """``tenant:secret`` pairs (blank items skipped); the secret may itself contain ':'."""
    secrets: dict[str, str] = {}
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        tenant, sep, secret = item.partition(":")
        tenant, secret = tenant.strip(), secret.strip()
        if not sep or not tenant or not secret:
            raise WebhookConfigError(f"malformed webhook secret entry in {source}: expected 'tenant:secret'")
        if len(secret) < MIN_SECRET_LENGTH:
            raise WebhookConfigError(f"the webhook secret of tenant {tenant!r} in {source} is too short (at least {MIN_SECRET_LENGTH} characters)")
        secrets[tenant] = secret
    return secrets


def inline_secrets(text: str) -> dict[str, str]:
    return parse_secret_pairs(text.replace("\n", ",").split(","), "COMPACTOR_WEBHOOK_SECRETS")


def webhook_secrets(settings: Settings) -> dict[str, str]:
    """tenant → secret from the settings and the secrets file (read on every call, so a rotated
    file takes effect without a restart). Raises ``WebhookConfigError`` when the file cannot be read."""
    secrets = inline_secrets(settings.webhook_secrets)
    path = settings.webhook_secrets_file
    if path is not None:
        try:
            text = path.expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise WebhookConfigError(f"cannot read COMPACTOR_WEBHOOK_SECRETS_FILE: {exc.strerror or exc}") from exc
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        secrets.update(parse_secret_pairs(lines, "COMPACTOR_WEBHOOK_SECRETS_FILE"))
    return secrets


def secret_for(settings: Settings, tenant: str) -> str | None:
    return webhook_secrets(settings).get(tenant)


def check_notify_url(url: str, settings: Settings, tenant: str) -> WebhookTarget:
    """The submission check: the host is allowlisted and the tenant can sign. Raises ``InvalidSpec``
    (``field="notify.url"``) naming what the operator must configure; ``WebhookConfigError`` when
    the secrets file cannot be read."""
    target = allowed_target(url, parse_allowlist(settings.webhook_allowed_hosts))
    if secret_for(settings, tenant) is None:
        raise InvalidSpec(
            f"tenant {tenant!r} has no webhook signing secret: the operator must add '{tenant}:<secret>' to "
            "COMPACTOR_WEBHOOK_SECRETS (or COMPACTOR_WEBHOOK_SECRETS_FILE)",
            field=NOTIFY_FIELD,
        )
    return target


# -- payload and signature -----------------------------------------------------------------------------


def notify_url_of(job: Job) -> str | None:
    """The job's ``spec.notify.url``, or None when it asked for no webhook."""
    notify = job.spec.get("notify")
    url = notify.get("url") if isinstance(notify, dict) else None
    return url if isinstance(url, str) and url else None


def delivery_id_for(job: Job) -> str:
    """One id per job end, the same on every retry (a job ends once: terminal states are final)."""
    return f"{job.id}.finished"


def job_document(job: Job) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (``compactor.documents.JobOut``), as JSON values."""
    document: dict[str, Any] = JobOut.of(job).model_dump(mode="json", exclude_unset=True)
    return document


def payload_for(job: Job) -> bytes:
    """The request body: the job document as compact UTF-8 JSON (what the signature covers), the
    very bytes ``GET /v1/jobs/{id}`` sends."""
    return job_json(job)


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Compactor-Signature`` header value for ``body`` sent at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},{SIGNATURE_VERSION}={_mac(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> bool:
    """The receiver's check: ``header`` (``Compactor-Signature``) signs ``body`` with ``secret``
    and its timestamp is within ``tolerance_seconds`` of ``now`` (replays are refused).

    Several ``v1=`` values are accepted (any may match), so a sender can sign with an old and a
    new secret while one is rotated. Compares in constant time."""
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == SIGNATURE_VERSION:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = _mac(secret, timestamp, body)
    # Every candidate is compared (no early exit) so the time taken says nothing about which matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    return matched


# -- delivery ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    status_code: int | None = None
    error: str | None = None  # why it was not delivered when there is no status to say it
    refused: bool = False  # the URL is not allowed: no request was made, and none ever will be

    def describe(self) -> str:
        if self.delivered:
            return f"delivered ({self.status_code})"
        if self.status_code is not None:
            return f"answered {self.status_code}"
        return self.error or "not delivered"


def backoff_seconds(attempt: int, base: float, *, cap: float = MAX_BACKOFF_SECONDS, rand: Callable[[], float] = random.random) -> float:
    """Delay before attempt ``attempt + 1``: ``base`` doubling per attempt, capped, with jitter.

    Half the delay is fixed and half random, so retries of many jobs after a receiver outage
    spread out but never come sooner than half the schedule."""
    delay = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return delay / 2 + rand() * delay / 2


def deliver(
    url: str,
    body: bytes,
    *,
    secret: str,
    delivery_id: str,
    allowlist: Iterable[AllowedHost],
    timeout: float,
    now: Callable[[], float] = time.time,
    transport: httpx.BaseTransport | None = None,
) -> DeliveryResult:
    """POST ``body`` to ``url``, signed; 2xx is delivered. Never raises for a network failure.

    The allowlist is checked here again, on the parse the request uses: a host that is not
    on it is never contacted. Redirects are not followed (a 3xx is a failed attempt), proxy
    and credential settings from the environment are ignored (``trust_env=False``: a
    ``.netrc`` must never add credentials to a tenant's URL), and the response body is never
    read. ``timeout`` bounds each network operation (connect, write, read), not their sum."""
    try:
        target = allowed_target(url, allowlist)
    except InvalidSpec as exc:
        return DeliveryResult(False, error=exc.message, refused=True)
    timestamp = int(now())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: EVENT_JOB_FINISHED,
        DELIVERY_HEADER: delivery_id,
        SIGNATURE_HEADER: sign(secret, body, timestamp),
    }
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, transport=transport) as client,
            client.stream("POST", target.url, content=body, headers=headers) as response,
        ):
            status = response.status_code
    except httpx.HTTPError as exc:
        return DeliveryResult(False, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return DeliveryResult(200 <= status < 300, status_code=status)
