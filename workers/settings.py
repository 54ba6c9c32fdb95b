"""The workers' own settings (pydantic-settings, environment variables `LMEDIT_*`).

Only the fields a worker reads. Names and defaults are those of app/settings.py, so that one environment
configures both sides (tests/test_layers.py checks that they agree); workers/ never imports app/.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMEDIT_", extra="ignore")

    # --- model and store ---
    model: str = "smollm2"  # "smollm2" (embedded), a local HF folder or a .gguf file
    store: str = "./lmedit-store"  # a local folder or an fsspec URL (s3://bucket/prefix)
    cache_dir: str | None = None  # where a GGUF's fp32 weights are cached (~/.cache/lmedit)
    device: str | None = None  # "cuda", "cpu"; default: CUDA when present
    threads: int | None = None  # torch intra-op threads (default: every core but one)
    keyframe_every: int = 20  # a stored sum every this many versions of a chain: flat cold checkouts (0: none)
    # the edit that makes this many edits stack on the branch's last rebase also consolidates it (0: never;
    # app/settings.py says why 50)
    auto_consolidate_after: int = 50
    # Text for the generic keys' second moment C₀ of memit / alphaedit: "builtin" (ships with lmedit), or a text
    # file or folder of .txt files on the workers' machine (a corpus of the kind the model reads); and how many
    # tokens of it are read. Every edit and rebase of the service uses them; a request may not name them.
    # WikiText-2 kept +0.015 locality in a 1,000-fact rebase (docs/measurements.md "Where C₀ comes from")
    c0_source: str = Field("builtin", max_length=1000)  # the ranges of the hparams of the same names
    c0_tokens: int = Field(100_000, ge=16, le=10_000_000)

    # --- queue ---
    redis_url: str = "redis://127.0.0.1:6399/0"
    worker_heartbeat_s: float = 5.0  # heartbeat period while idle or busy
    worker_ttl_s: int = 30  # a worker silent this long is dead; its job is retried by another
    maintenance_interval_s: int = 15  # how often workers look for abandoned jobs
    generate_batch_max: int = 16  # generation requests of one version a worker decodes as one batch
    generate_batch_wait_ms: float = 15.0  # how long a worker waits for more of them to join a batch
    generate_batch_join: bool = True  # requests arriving while a batch decodes join it between steps
    # queued edits of one branch a worker applies together as one version (workers/coalesce.py): at most
    # this many facts (fine-tuning methods; ft-m batches work up to about 8), 1: never
    edit_coalesce_max_facts: int = 8
    # memit / alphaedit: 1 (not coalesced). A batch trains until its slowest fact's value is done: 32
    # alphaedit edits coalesced took 1.22x the time of 32 single ones on CPU (benchmarks/coalesce.py).
    # Raise it where a batch step costs about what one fact's does (a GPU; not measured here).
    edit_coalesce_max_facts_locate: int = 1


@lru_cache
def get_settings() -> WorkerSettings:
    return WorkerSettings()
