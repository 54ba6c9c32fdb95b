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
OTHER_ENV = {"VIRTUAL_ENV", "PATH", "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_INDEX_URL"}


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


def test_compose_parses_and_names_what_exists():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker"}
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
        assert service["healthcheck"]["test"][0] == "CMD"
    queues = services["worker"]["command"][services["worker"]["command"].index("--queues") + 1].split(",")
    assert set(queues) <= set(protocol.QUEUES)
    assert protocol.WORKERS in services["worker"]["healthcheck"]["test"][-1]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
