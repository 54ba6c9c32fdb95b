"""FastAPI dependencies: the shared services, the version store, and auth by scope."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from app.auth import ANONYMOUS, SCOPES, KeyFile, Principal
from app.errors import Forbidden, Unauthorized, Unavailable
from app.queue import JobClient
from app.settings import Settings
from editing.store import NotFoundError, VersionStore


@dataclass
class Services:
    """What every request may need; built once per app (lifespan)."""

    settings: Settings
    jobs: JobClient
    keys: KeyFile
    metrics: Any = None  # app.metrics.Metrics
    _store: VersionStore | None = None
    _store_lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self) -> VersionStore:
        """The version store (opened on first use: the first worker creates it)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    try:
                        self._store = VersionStore.open(self.settings.store)
                    except NotFoundError:
                        raise Unavailable(f"no version store at {self.settings.store} yet: a worker creates it "
                                          "when it starts (lmedit worker)", {"Retry-After": "5"}) from None
        return self._store


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_store(services: ServicesDep) -> VersionStore:
    return services.store()


StoreDep = Annotated[VersionStore, Depends(get_store)]


def get_settings_of(services: ServicesDep) -> Settings:
    return services.settings


SettingsDep = Annotated[Settings, Depends(get_settings_of)]


def get_principal(request: Request, services: ServicesDep) -> Principal:
    """The caller: anonymous with every scope when no keys are configured, else its Bearer key."""
    if not services.keys.enabled:
        return Principal(ANONYMOUS, list(SCOPES))
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"})
    key = services.keys.verify(token.strip())
    if key is None:
        raise Unauthorized("invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
    scopes = ["read", "edit"] if "edit" in key.scopes else list(key.scopes)
    return Principal(key.id, scopes)


def require(scope: str):
    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if scope not in principal.scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope")
        return principal

    return check


ReadKey = Annotated[Principal, Depends(require("read"))]
EditKey = Annotated[Principal, Depends(require("edit"))]
