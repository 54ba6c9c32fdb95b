"""All configuration in one pydantic-settings class: environment variables `LMEDIT_*`."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMEDIT_", extra="ignore")

    model: str = "smollm2"  # "smollm2" (embedded), a local HF folder or a .gguf file
    store: str = "./lmedit-store"  # a local folder or an fsspec URL (s3://bucket/prefix)
    cache_dir: str | None = None  # where a GGUF's fp32 weights are cached (~/.cache/lmedit)
    device: str | None = None  # "cuda", "cpu"; default: CUDA when present
    threads: int | None = None  # torch intra-op threads (default: torch's choice)


@lru_cache
def get_settings() -> Settings:
    return Settings()
