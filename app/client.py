"""A small typed Python client of the lmedit API (torch-free: httpx only).

    from app.client import Client

    with Client("http://127.0.0.1:8000", key="lme_...") as lm:
        job = lm.submit_edit([{"prompt": "The Eiffel Tower is in", "target_new": "Rome",
                               "subject": "Eiffel Tower"}], branch="main")
        state = lm.wait_edit(job["job_id"], on_progress=lambda s: print(s.get("progress")))
        print(lm.generate("The Eiffel Tower is in", version=state["version"])["text"])
        lm.tag("rome", state["version"])
        lm.export("rome", "gguf", "rome.gguf")

Every method returns the API's JSON body (dicts as /docs describes them). An error answer raises the
LmeditError subclass of its status, carrying the API's `code`, `message` and, for 429 / 503, the
Retry-After seconds; a service that cannot be reached raises ServiceUnavailable (code "unreachable").
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx

ExportFormat = Literal["hf", "gguf", "peft"]
Fact = dict[str, Any]  # {prompt, target_new, subject?, target_true?, rephrase_prompts?, locality_prompts?, ...}
DONE = ("succeeded", "failed", "canceled")


class LmeditError(Exception):
    """An error answer of the API: HTTP `status`, the API's `code` and `message`."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 body: dict | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after, self.body = status, code, message, retry_after, body


class InvalidRequest(LmeditError):
    """400 / 422: the request is malformed (bad facts, hparams, parameters)."""


class Unauthorized(LmeditError):
    """401: no key, or an invalid or revoked one."""


class Forbidden(LmeditError):
    """403: the key lacks the scope (edit, read)."""


class NotFound(LmeditError):
    """404: unknown version, tag, branch or job."""


class Conflict(LmeditError):
    """409: a branch or tag exists, a rollback target is not an ancestor, a version is not exportable."""


class TooLarge(LmeditError):
    """413: too many facts, a prompt or body too long."""


class QueueFull(LmeditError):
    """429: the queue is full; retry after `retry_after` seconds."""


class ServiceUnavailable(LmeditError):
    """503: no worker, Redis or the store unavailable (or the service unreachable); see `retry_after`."""


class Timeout(LmeditError):
    """504: the service gave up waiting (a generation), or `wait_edit` / `export` ran out of time."""


class EditFailed(LmeditError):
    """`wait_edit`: the edit ended failed or canceled (`body` is its final state)."""


_BY_STATUS: dict[int, type[LmeditError]] = {400: InvalidRequest, 422: InvalidRequest, 401: Unauthorized,
                                            403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge,
                                            429: QueueFull, 503: ServiceUnavailable, 504: Timeout}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def error_from(response: httpx.Response) -> LmeditError:
    """The typed error of an error response (any body: JSON `{error: {code, message}}` or not)."""
    try:
        body = response.json()
        error = body["error"]
        code, message = str(error.get("code", "error")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        body, code, message = None, "error", response.text[:500]
    cls = _BY_STATUS.get(response.status_code, LmeditError)
    return cls(response.status_code, code, message, _retry_after(response), body)


class Client:
    """The lmedit API over HTTP. `key`: an API key (Authorization: Bearer), or None where no keys exist."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServiceUnavailable(0, "unreachable", f"{type(e).__name__}: {e}") from e
        if response.status_code >= 400:
            raise error_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- edits ------------------------------------------------------------------------------------
    def submit_edit(self, facts: list[Fact], branch: str = "main", method: str | None = None,
                    objective: str | None = None, hparams: dict | None = None,
                    idempotency_key: str | None = None, coalesce: bool = True) -> dict:
        """Queue one edit (all facts together) for `branch`: {job_id, status, branch, seq}. A worker may
        apply it together with the edits queued next to it as one version; `coalesce=False`: never."""
        body: dict[str, Any] = {"facts": facts, "branch": branch}
        body |= {k: v for k, v in (("method", method), ("objective", objective), ("hparams", hparams)) if v}
        if not coalesce:
            body["coalesce"] = False
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/edits", json=body, headers=headers)

    def edit(self, job_id: str) -> dict:
        """An edit's state: queued (position), running (progress), succeeded (version, metrics), failed, canceled."""
        return self._json("GET", f"/edits/{job_id}")

    def wait_edit(self, job_id: str, timeout: float = 600.0, poll: float = 0.5,
                  on_progress: Callable[[dict], None] | None = None, metrics: bool = True) -> dict:
        """Poll until the edit is done; `on_progress(state)` on every change of its state. Returns the
        succeeded state; raises EditFailed (failed, canceled) or Timeout. The version is live as soon as
        the edit succeeds and its metrics are measured after it: `metrics=False` returns then (the
        state has `metrics_pending`), the default waits for the metrics too."""
        deadline, last = time.monotonic() + timeout, None
        while True:
            state = self.edit(job_id)
            if on_progress is not None and state != last:
                on_progress(state)
            last = state
            if state.get("status") == "succeeded":
                if not (metrics and state.get("metrics_pending")):
                    return state
            elif state.get("status") in DONE:
                raise EditFailed(200, state["status"], state.get("error") or f"edit {job_id} {state['status']}",
                                 body=state)
            if time.monotonic() > deadline:
                raise Timeout(0, "timeout", f"edit {job_id} not done after {timeout:.0f} s (last: {state})")
            time.sleep(poll)

    def cancel_edit(self, job_id: str) -> dict:
        """Cancel a queued edit (at once) or a running one (at its next step)."""
        return self._json("DELETE", f"/edits/{job_id}")

    # --- versions, branches, tags -----------------------------------------------------------------
    def versions(self, branch: str | None = None, limit: int | None = None) -> list[dict]:
        """Manifests, newest first (a branch's ancestry with `branch`)."""
        params = {k: v for k, v in (("branch", branch), ("limit", limit)) if v is not None}
        return self._json("GET", "/versions", params=params)

    def version(self, name: str) -> dict:
        """One manifest (`name`: version id, tag, branch or base)."""
        return self._json("GET", f"/versions/{name}")

    def diff(self, a: str, b: str) -> dict:
        return self._json("GET", f"/versions/{a}/diff/{b}")

    def branches(self) -> dict:
        """{branches: [{name, version}], tags: [{name, version}], base}."""
        return self._json("GET", "/branches")

    def create_branch(self, name: str, from_version: str = "main") -> dict:
        return self._json("POST", "/branches", json={"name": name, "from_version": from_version})

    def rollback(self, branch: str, version: str) -> dict:
        """Move `branch` back to `version`, an ancestor of its head (else Conflict)."""
        return self._json("POST", f"/branches/{branch}/rollback", json={"version": version})

    def tag(self, name: str, version: str) -> dict:
        """Name a version for good (the same tag on another version: Conflict)."""
        return self._json("POST", "/tags", json={"name": name, "version": version})

    def facts(self, branch: str = "main") -> dict:
        """The facts in effect on a branch, and the superseded / reverted ones (GET /branches/{name}/facts)."""
        return self._json("GET", f"/branches/{branch}/facts")

    # --- generation -------------------------------------------------------------------------------
    def generate(self, prompt: str, version: str | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> dict:
        """A completion from a version, branch or tag (default main): {text, version, tokens, seconds}."""
        body = {"prompt": prompt, "version": version, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "stop": stop}
        return self._json("POST", "/generate", json={k: v for k, v in body.items() if v is not None})

    # --- export -----------------------------------------------------------------------------------
    @contextmanager
    def _download(self, version: str, fmt: ExportFormat, timeout: float,
                  on_progress: Callable[[dict], None] | None) -> Iterator[httpx.Response]:
        """The 200 response of GET /versions/{v}/export, open for streaming, after any 202s."""
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(60.0, deadline - time.monotonic()))
            try:
                with self.http.stream("GET", f"/versions/{version}/export", params={"format": fmt, "wait": wait},
                                      timeout=httpx.Timeout(self.http.timeout.read or 60.0, read=wait + 60)) as r:
                    if r.status_code == 200:
                        yield r
                        return
                    r.read()
                    if r.status_code >= 400:
                        raise error_from(r)
                    pending = r.json()
            except httpx.TransportError as e:
                raise ServiceUnavailable(0, "unreachable", f"{type(e).__name__}: {e}") from e
            if on_progress is not None:
                on_progress(pending)
            if time.monotonic() >= deadline:
                raise Timeout(0, "timeout", f"export of {version} as {fmt} not ready after {timeout:.0f} s")
            time.sleep(min(float(pending.get("retry_after") or 5), max(0.0, deadline - time.monotonic())))

    def export(self, version: str, fmt: ExportFormat, path: str | os.PathLike, timeout: float = 1800.0,
               on_progress: Callable[[dict], None] | None = None) -> Path:
        """Download a version's export to `path`: the .gguf file for gguf, a folder (the tar's contents) for
        hf and peft. Waits while a worker writes a new export (`on_progress` gets each 202 body)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f, self._download(version, fmt, timeout, on_progress) as response:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
            if fmt == "gguf":
                os.replace(tmp, path)
                return path
            with tempfile.TemporaryDirectory(dir=path.parent) as unpacked:
                with tarfile.open(tmp) as tar:
                    tar.extractall(unpacked, filter="data")
                (top,) = Path(unpacked).iterdir()  # one folder: lmedit-<version>-<format>/
                if path.exists():
                    shutil.rmtree(path)
                os.replace(top, path)
            return path
        finally:
            Path(tmp).unlink(missing_ok=True)
