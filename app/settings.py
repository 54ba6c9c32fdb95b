"""All configuration in one pydantic-settings class: environment variables `LMEDIT_*`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_PORT = 6399  # where lmedit api / worker look when neither LMEDIT_REDIS_URL nor the store says
REDIS_URL_FILE = "redis.url"  # in a local store folder: the URL of the server `lmedit up` started for it


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMEDIT_", extra="ignore")

    # --- model and store (workers, CLI) ---
    model: str = "smollm2"  # "smollm2" (embedded), a local HF folder or a .gguf file
    store: str = "./lmedit-store"  # a local folder or an fsspec URL (s3://bucket/prefix)
    cache_dir: str | None = None  # where a GGUF's fp32 weights are cached (~/.cache/lmedit)
    device: str | None = None  # "cuda", "cpu"; default: CUDA when present
    threads: int | None = None  # torch intra-op threads (default: torch's choice; workers: cores - 1)
    # GET /branches/{name} suggests consolidating once this many edits stack on the last rebase (or base).
    # 50: the policy measured in docs/measurements.md "Sequential edits, stacked and consolidated": a branch
    # consolidated every 50 edits held 1,000 facts at 0.913 retention / 0.714 locality where the stacked
    # branch held 0.581 / 0.487 (REPORT.md section 3)
    consolidate_after: int = 50
    # The edit that makes this many edits stack on the branch's last rebase also consolidates the branch, in
    # the same job, before it reports (0: never; a client consolidates when it chooses): docs/measurements.md
    # "Sequential edits, stacked and consolidated".
    # 50 since stop 39: the default values stacked cost locality, consolidated every 50 they beat the old
    # stacked default on every axis from 100 edits on (docs/measurements.md "The value's defaults")
    auto_consolidate_after: int = 50
    keyframe_every: int = 20  # a stored sum every this many versions of a chain: flat cold checkouts (0: none)
    # Text for the generic keys' second moment C₀ of memit / alphaedit: "builtin" (ships with lmedit), or a text
    # file or folder of .txt files on the workers' machine (a corpus of the kind the model reads); and how many
    # tokens of it are read. Every edit and rebase of the service uses them; a request may not name them.
    # WikiText-2 kept +0.015 locality in a 1,000-fact rebase (docs/measurements.md "Where C₀ comes from")
    c0_source: str = Field("builtin", max_length=1000)  # the ranges of the hparams of the same names
    c0_tokens: int = Field(100_000, ge=16, le=10_000_000)

    # --- service ---
    # Unset: the URL in STORE/redis.url (written by a running `lmedit up`), else this default
    redis_url: str = f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0"
    host: str = "127.0.0.1"  # where `lmedit api` binds (anything but loopback needs API keys)
    port: int = 8000
    keys_file: str | None = None  # API key hashes (default: <store>/keys.json for a local store)
    require_durable: bool = False  # refuse to start on a Redis that cannot promise a 202 is on disk (up: on)
    durable_timeout_ms: int = 1000  # how long an edit waits for WAITAOF's fsync before it is withdrawn (503)

    # --- limits ---
    max_prompt_chars: int = 4000  # per prompt (413 beyond)
    max_facts: int = 32  # facts per edit request (413 beyond)
    max_new_tokens: int = 512  # per generation (422 beyond)
    max_batch_prompts: int = 16  # prompts per completion request (413 beyond)
    max_queue_depth: int = 64  # generations waiting; beyond: 429 + Retry-After
    max_edit_queue_depth: int = 1024  # edits waiting (a pipeline's burst; coalesced when applied)
    max_body_bytes: int = 1_000_000  # request bodies (413 beyond)
    retry_after_s: int = 5  # Retry-After of a 429

    # --- jobs ---
    generate_timeout_s: float = 120.0  # how long a request waits for its generation (504 beyond)
    edit_timeout_s: int = 600  # an edit job's timeout: this plus edit_timeout_per_fact_s per fact
    edit_timeout_per_fact_s: int = 120
    job_retries: int = 2  # retries of a job whose worker died
    result_ttl_s: int = 7 * 86400  # how long Redis keeps an edit's status (the store keeps versions forever)
    idempotency_ttl_s: int = 86400

    # --- workers ---
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
def get_settings() -> Settings:
    return Settings()


def store_folder(settings: Settings) -> Path | None:
    """The store's local folder, or None for a remote store (s3://...)."""
    if "://" in settings.store and not settings.store.startswith("file://"):
        return None
    return Path(settings.store.removeprefix("file://")).expanduser()


def keys_file_path(settings: Settings) -> Path | None:
    """Where API key hashes live: LMEDIT_KEYS_FILE, else keys.json inside a local store."""
    if settings.keys_file:
        return Path(settings.keys_file).expanduser()
    folder = store_folder(settings)
    return folder / "keys.json" if folder is not None else None


def with_store_redis(settings: Settings) -> Settings:
    """The Redis URL given (LMEDIT_REDIS_URL, --redis-url) wins; else the one a running `lmedit up` wrote
    into the store folder, so that `lmedit api` / `lmedit worker` started later find its embedded server."""
    folder = store_folder(settings)
    if "redis_url" in settings.model_fields_set or folder is None:
        return settings
    try:
        url = (folder / REDIS_URL_FILE).read_text().strip()
    except OSError:
        return settings
    return settings.model_copy(update={"redis_url": url}) if url else settings
