"""`lmedit up`'s supervisor: keeps its children (valkey-server, the workers, the API) running.

A child that dies is started again after a backoff that doubles with each quick death in a row
(1 s, 2 s, 4 s, 8 s). A death is quick when the child ran for less than `window_s` seconds: one
that dies quickly `max_deaths` times in a row has something wrong that a restart will not fix
(a bad model path, a busy port), so the supervisor gives up: `lmedit up` stops everything and
exits non-zero with that reason. A child that ran for longer starts the count afresh (a worker
killed for memory once an hour is restarted every time).
Otherwise only Ctrl-C / SIGTERM stops the service. A worker's job that was running when it
died is retried by RQ (its execution expires without heartbeats) on the restarted or another worker.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass


class GaveUp(RuntimeError):
    """A child kept dying: the reason, for the log and the exit message."""


def describe_exit(returncode: int) -> str:
    """'exit code 1' or 'killed by SIGKILL' (Popen reports a signal as a negative code)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen]  # starts the process (may raise: counts as a death)
    grace_s: float = 10.0  # SIGTERM, then SIGKILL after this long
    proc: subprocess.Popen | None = None
    started_at: float = 0.0  # monotonic
    quick_deaths: int = 0  # deaths in a row, each within the window after its start
    restart_at: float | None = None  # when a dead child is due to start again
    restarts: int = 0


class Supervisor:
    def __init__(self, log: Callable[[str], None], *, max_deaths: int = 5, window_s: float = 60.0,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0):
        self.log = log
        self.max_deaths, self.window_s = max_deaths, window_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.children: list[Child] = []

    def add(self, name: str, start: Callable[[], subprocess.Popen], grace_s: float = 10.0) -> Child:
        """Start a child now (a failure here is fatal: nothing has run yet) and supervise it from then on."""
        child = Child(name, start, grace_s)
        child.proc, child.started_at = start(), time.monotonic()
        self.log(f"started {name} (pid {child.proc.pid})")
        self.children.append(child)
        return child

    def _died(self, child: Child, why: str, now: float) -> None:
        child.proc = None
        child.quick_deaths = child.quick_deaths + 1 if now - child.started_at < self.window_s else 1
        n = child.quick_deaths
        if n >= self.max_deaths:
            raise GaveUp(f"{child.name} died {n} times in a row, each within {self.window_s:.0f} s of its start "
                         f"(last: {why}): giving up")
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (n - 1))
        child.restart_at = now + delay
        self.log(f"{child.name} {why}: restarting it in {delay:g} s ({n} quick death(s) in a row)")

    def poll(self) -> None:
        """One round: notice children that died, start those whose backoff is over. Raises GaveUp."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and (rc := child.proc.poll()) is not None:
                self._died(child, describe_exit(rc), now)
            elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.restart_at, child.started_at = None, now
                try:
                    child.proc = child.start()
                except (OSError, RuntimeError) as e:
                    self._died(child, f"failed to start ({e})", time.monotonic())
                    continue
                child.restarts += 1
                self.log(f"restarted {child.name} (pid {child.proc.pid}, restart {child.restarts})")

    def run(self, on_tick: Callable[[], None] | None = None, interval_s: float = 0.5,
            stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Supervise until `stop_requested()` (lmedit up's Ctrl-C and SIGTERM handlers set it), or GaveUp."""
        while not stop_requested():
            self.poll()
            if on_tick is not None:
                on_tick()
            time.sleep(interval_s)

    def stop(self) -> None:
        """Stop the children in reverse order of start (the API first, Redis last): SIGTERM, then SIGKILL."""
        for child in reversed(self.children):
            proc, child.restart_at = child.proc, None
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(child.grace_s)
            except subprocess.TimeoutExpired:
                self.log(f"{child.name} did not stop within {child.grace_s:.0f} s: killing it")
                proc.kill()
                proc.wait()
