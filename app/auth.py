"""API keys: `Authorization: Bearer KEY`, scopes `read` and `edit` (edit implies read).

Keys live in a JSON file of sha256 hashes (`lmedit keys create|list|revoke` manage it); the
key itself is printed once at creation and never stored. With no (unrevoked) keys, every
endpoint is open, and `lmedit api` / `lmedit up` refuse to bind to anything but loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SCOPES = ("read", "edit")
KEY_PREFIX = "lme_"
ANONYMOUS = "anonymous"  # the key id of requests when no keys are configured


@dataclass
class ApiKey:
    id: str
    sha256: str
    scopes: list[str]
    created_at: str
    name: str = ""
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or (scope == "read" and "edit" in self.scopes)


@dataclass
class Principal:
    """Who is calling: a key id (or `anonymous` when auth is off) and its scopes."""

    key_id: str
    scopes: list[str] = field(default_factory=list)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class KeyFile:
    """The key file: `{"keys": [ApiKey, ...]}`. Reads are cached and refreshed when the file changes,
    so a revocation takes effect on the next request without a restart."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._keys: list[ApiKey] = []

    def keys(self) -> list[ApiKey]:
        if self.path is None:
            return []
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        stamp = (st.st_mtime, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                data = json.loads(self.path.read_text() or "{}")
                self._keys = [ApiKey(**k) for k in data.get("keys", [])]
                self._stamp = stamp
            return list(self._keys)

    def active_keys(self) -> list[ApiKey]:
        return [k for k in self.keys() if k.active]

    @property
    def enabled(self) -> bool:
        """Auth is on once any key exists (a file whose keys are all revoked still locks everything)."""
        return bool(self.keys())

    def verify(self, key: str) -> ApiKey | None:
        digest = hash_key(key)
        for k in self.active_keys():
            if hmac.compare_digest(k.sha256, digest):
                return k
        return None

    def _write(self, keys: list[ApiKey]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in keys]}, f, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def create(self, scope: str, name: str = "") -> tuple[str, ApiKey]:
        """A new key with `scope` (read or edit): returns (the key, its record). Shown once."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
        if self.path is None:
            raise ValueError("no key file: set LMEDIT_KEYS_FILE")
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
        record = ApiKey(id=key_id, sha256=hash_key(key), scopes=[scope], created_at=_now(), name=name)
        self._write(self.keys() + [record])
        return key, record

    def revoke(self, key_id: str) -> ApiKey:
        keys = self.keys()
        for k in keys:
            if k.id == key_id:
                if k.active:
                    k.revoked_at = _now()
                    self._write(keys)
                return k
        raise KeyError(f"no key with id {key_id!r}")


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
