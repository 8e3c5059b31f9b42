"""API keys → tenants.

Keys come from ``COMPACTOR_API_KEYS`` (``"tenant:key,tenant:key"``) and/or
``api_keys_file`` (one ``tenant:key`` per line, ``#`` comments). Only sha256 hashes
are kept; a presented key is hashed and compared with ``hmac.compare_digest``
against *every* stored hash, so the time taken does not depend on which (if any)
matched. With no keys configured the gateway runs in open single-tenant mode
(tenant ``"default"``), which the CLI only allows on a loopback address unless
``insecure`` is set (``check_bind_allowed``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass

from compactor.settings import Settings

DEFAULT_TENANT = "default"
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    tenant: str


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        entries: list[_Entry] = []
        for tenant, key in pairs:
            if not _TENANT_RE.match(tenant):
                raise ValueError(f"invalid tenant name {tenant!r} in the API key configuration")
            if len(key) < 8:
                raise ValueError(f"the API key of tenant {tenant!r} is too short (at least 8 characters)")
            entries.append(_Entry(_hash(key), tenant))
        self._entries = tuple(entries)

    @property
    def open_mode(self) -> bool:
        return not self._entries

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant of ``key``, or None. Constant-time over the stored hashes."""
        presented = _hash(key or "")
        found: str | None = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest) and found is None and key:
                found = entry.tenant
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        pairs = parse_pairs(settings.api_keys.replace("\n", ",").split(","), "COMPACTOR_API_KEYS")
        if settings.api_keys_file is not None:
            text = settings.api_keys_file.expanduser().read_text(encoding="utf-8")
            lines = [line.split("#", 1)[0] for line in text.splitlines()]
            pairs += parse_pairs(lines, str(settings.api_keys_file))
        return cls(pairs)


def parse_pairs(items: list[str], source: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise ValueError(f"malformed API key entry in {source}: expected 'tenant:key'")
        pairs.append((tenant.strip(), key.strip()))
    return pairs


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_bind_allowed(settings: Settings, keyring: KeyRing | None = None) -> None:
    """Refuse open mode on a non-loopback address unless ``settings.insecure``."""
    ring = keyring or KeyRing.from_settings(settings)
    if not ring.open_mode or settings.insecure:
        return
    host = settings.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise RuntimeError(
            f"no API keys are configured: refusing to listen on {host}; set COMPACTOR_API_KEYS, listen on 127.0.0.1, or pass --insecure"
        )
