"""docker/Dockerfile and docker-compose.yml parse, and every command, option, env var and path they
use exists in the project (no docker needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from typer.main import get_command

from app.cli import app as cli_app
from app.settings import Settings
from workers import protocol

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {f"LMEDIT_{name.upper()}" for name in Settings.model_fields}
OTHER_ENV = {"VIRTUAL_ENV", "PATH", "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_INDEX_URL",
             "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}  # s3fs/botocore
S3_PROFILE = {"minio", "minio-bucket", "api-s3", "worker-s3"}


def check_lmedit_command(argv: list[str]) -> None:
    """`lmedit SUB --opt ...`: the subcommand and every option exist."""
    assert argv[0] == "lmedit", argv
    group = get_command(cli_app)
    command = group.commands[argv[1]]
    options = {o for p in command.params for o in p.opts}
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"lmedit {argv[1]} has no option {arg}"


def check_env(name: str) -> None:
    if name.startswith("LMEDIT_"):
        assert name in SETTINGS, f"{name} is not a Settings field"
    else:
        assert name in OTHER_ENV, name


def test_dockerfile_parses_and_names_what_exists():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [line.strip().split(None, 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    known = {"ARG", "FROM", "RUN", "ENV", "WORKDIR", "COPY", "VOLUME", "EXPOSE", "HEALTHCHECK", "CMD"}
    assert all(len(i) == 2 and i[0] in known for i in instructions), instructions
    stages = [i[1] for i in instructions if i[0] == "FROM"]
    assert "base-${BASE}" in stages[-1] and {"python:3.11-slim AS base-cpu"} <= set(stages)
    assert any("AS base-cuda" in s for s in stages)
    for kind, arg in instructions:
        if kind == "ENV":
            for name in re.findall(r"(\w+)=", arg):
                check_env(name)
        if kind == "COPY":
            for src in shlex.split(arg)[:-1]:
                assert (ROOT / src).exists(), src
        if kind == "CMD":
            check_lmedit_command(__import__("json").loads(arg))
        if kind == "HEALTHCHECK":
            assert "/health" in arg
    extra = re.search(r"^s3 = \[.*s3fs", (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra and any(kind == "RUN" and '".[s3]"' in arg for kind, arg in instructions)  # s3fs in the image


def test_compose_parses_and_names_what_exists():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker"} | S3_PROFILE
    assert {name for name, s in services.items() if "profiles" not in s} == {"redis", "api", "worker"}
    assert {"store", "redis-data"} <= set(compose["volumes"])
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd and redis_cmd[redis_cmd.index("--appendfsync") + 1] == "always"
    for name in ("api", "worker"):
        service = services[name]
        check_lmedit_command(service["command"])
        for var in service["environment"]:
            check_env(var)
        assert (ROOT / service["build"]["dockerfile"]).exists()
        assert service["build"]["args"]["BASE"] in ("cpu", "cuda")
        assert any(v.startswith("store:") for v in service["volumes"])
    for service in services.values():
        if service.get("restart") != "no":  # a one-shot service (the bucket's creation) has none
            assert service["healthcheck"]["test"][0] == "CMD"
    queues = services["worker"]["command"][services["worker"]["command"].index("--queues") + 1].split(",")
    assert set(queues) <= set(protocol.QUEUES)
    assert protocol.WORKERS in services["worker"]["healthcheck"]["test"][-1]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_compose_s3_profile_is_the_scale_out_layout(tmp_path):
    """Profile "s3": MinIO, its bucket, the API and workers on the store in it, pointed there by the same
    environment tests/test_service_scaleout.py runs the service on; nothing shared but Redis and MinIO."""
    from tests.test_service_scaleout import machine

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in S3_PROFILE:
        assert services[name]["profiles"] == ["s3"], name
    assert "minio-data" in compose["volumes"]
    minio, bucket = services["minio"], services["minio-bucket"]
    assert minio["command"][0] == "server" and "--address" not in minio["command"]  # the S3 API on :9000
    assert bucket["command"][:2] == ["mb", "--ignore-existing"] and bucket["depends_on"]["minio"] == {
        "condition": "service_healthy"}
    alias, bucket_name = bucket["command"][2].split("/")
    user, password = minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"]
    assert bucket["environment"][f"MC_HOST_{alias}"] == f"http://{user}:{password}@minio:9000"

    default_redis = services["api"]["environment"]["LMEDIT_REDIS_URL"]
    scale_out_env = machine(tmp_path, "machine", "http://minio:9000")
    for name in ("api-s3", "worker-s3"):
        service = services[name]
        env = service["environment"]
        check_lmedit_command(service["command"])
        assert service["build"] == services["api"]["build"]  # the CPU image, which has s3fs
        assert env["LMEDIT_STORE"] == f"s3://{bucket_name}/store"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (user, password)
        assert {k for k in env if k.startswith("AWS_")} <= set(scale_out_env)
        for var in env:
            check_env(var)
        redis_url = env["LMEDIT_REDIS_URL"]
        assert redis_url.rsplit("/", 1)[0] == default_redis.rsplit("/", 1)[0] and redis_url != default_redis
        assert not any(v.startswith("store:") for v in service.get("volumes", []))  # the store is MinIO
        assert service["depends_on"]["minio-bucket"] == {"condition": "service_completed_successfully"}
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}
    worker = services["worker-s3"]
    assert worker["deploy"]["replicas"] >= 2 and "volumes" not in worker  # each its own model cache
    assert worker["environment"]["LMEDIT_CACHE_DIR"] != services["worker"]["environment"]["LMEDIT_CACHE_DIR"]
    assert "LMEDIT_KEYS_FILE" in services["api-s3"]["environment"]  # no local store folder to hold keys.json
