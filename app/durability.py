"""How durable an accepted edit is: what the API's Redis promises, found out at start, and the
per-request check of WAITAOF's reply.

A 202 must mean that the job is on disk. Two ways get there:
- `appendonly yes` + `appendfsync always` (the embedded server): Redis fsyncs the append-only
  file before it answers EXEC;
- WAITAOF (Redis >= 7.2, valkey >= 8) with `appendonly yes`: after EXEC the API waits until
  the local fsync happened and reads how many did. `appendfsync everysec` confirms within a
  second; `appendfsync no` leaves the flush to the OS, so WAITAOF never confirms it.
Anything else (no AOF, or no WAITAOF without `always`) is not durable: a Redis crash can lose
accepted jobs. The API then warns loudly at start, or refuses to start when
LMEDIT_REQUIRE_DURABLE is set (`lmedit up` sets it for its embedded server).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import redis
from redis.exceptions import ResponseError


@dataclass(frozen=True)
class Durability:
    aof: bool | None  # appendonly yes / no; None: the server refuses CONFIG GET (managed Redis)
    appendfsync: str | None  # always | everysec | no; None: unknown
    waitaof: bool  # the server has WAITAOF

    @property
    def confirm_per_request(self) -> bool:
        """Each acceptance waits for WAITAOF's local fsync count (and is withdrawn without one)."""
        return self.waitaof and self.aof is not False

    @property
    def durable(self) -> bool:
        """A 202 means the job is on disk (and edits can be accepted at all)."""
        return (self.aof is True and self.appendfsync == "always") or (
            self.confirm_per_request and self.appendfsync != "no")

    def describe(self) -> str:
        aof = {True: "appendonly yes", False: "appendonly no", None: "appendonly unknown"}[self.aof]
        setting = f"{aof}, appendfsync {self.appendfsync or 'unknown'}, WAITAOF {'yes' if self.waitaof else 'no'}"
        if self.confirm_per_request and self.appendfsync == "no":
            return f"{setting}: NOT durable, WAITAOF never sees an fsync, so every edit is refused with 503"
        if self.confirm_per_request:
            return f"{setting}: each accepted edit is confirmed on disk with WAITAOF"
        if self.durable:
            return f"{setting}: Redis fsyncs each write before it answers"
        return f"{setting}: NOT durable, a Redis crash can lose accepted edits"

    def as_dict(self) -> dict:
        return asdict(self) | {"durable": self.durable, "summary": self.describe()}


def probe(connection: redis.Redis) -> Durability:
    """Ask the server (raises redis.ConnectionError when it is down)."""
    aof: bool | None
    try:
        config = connection.config_get("append*")
        aof = str(config.get("appendonly", "")).lower() == "yes" if "appendonly" in config else None
        fsync = str(config["appendfsync"]).lower() if "appendfsync" in config else None
    except ResponseError:  # CONFIG disabled or renamed
        aof, fsync = None, None
    try:
        connection.execute_command("WAITAOF", 0, 0, 1)  # asks for nothing: answers at once where it exists
        waitaof = True
    except ResponseError:
        waitaof = False
    return Durability(aof=aof, appendfsync=fsync, waitaof=waitaof)


def fsync_confirmed(reply: object) -> bool:
    """WAITAOF numlocal numreplicas timeout answers [local fsyncs, replica fsyncs]: local must be >= 1."""
    return isinstance(reply, (list, tuple)) and len(reply) >= 1 and int(reply[0]) >= 1
