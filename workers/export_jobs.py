"""The export job (enqueued by name, see workers/protocol.py EXPORT): writes a version's weights in one
format into the store (editing/export.py: exports/<version>/<format>.json naming content-addressed
files), where the API streams them from. A version is immutable: an export already recorded is reused.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from editing.export import GGUF_NAME, ExportError, export, read_record, save_export
from editing.store import CorruptObjectError, NotFoundError, StoreError
from workers.engine import get_engine

log = logging.getLogger("lmedit.worker")


def _error(code: str, message: str) -> dict:
    return {"status": "failed", "error": {"code": code, "message": message}}


def export_version(request: dict) -> dict:
    """request: {"version": id, "format": "hf" | "gguf" | "peft"} -> {"status": "succeeded", "record"} or
    {"status": "failed", "error": {code, message}} (code: conflict, not_found, store_corrupt, internal_error)."""
    engine = get_engine()
    store, fmt = engine.store, request["format"]
    started = time.perf_counter()
    try:
        vid = store.resolve(request["version"])
        record = read_record(store, vid, fmt)
        if record is None:
            # Written next to the store when it is local (same disk, no /tmp limits), else in the temp dir.
            local = getattr(store.backend, "root", None)
            tmp_root = Path(local) / "exports" if isinstance(local, Path) else None
            if tmp_root is not None:
                tmp_root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".tmp-export-", dir=tmp_root) as tmp:
                folder = Path(tmp) / fmt
                folder.mkdir()
                export(engine.session, vid, fmt, folder / GGUF_NAME if fmt == "gguf" else folder,
                       source=engine.settings.model)
                record = save_export(store, vid, fmt, folder)
            log.info("exported %s as %s in %.1f s", vid, fmt, time.perf_counter() - started)
    except ExportError as e:
        return _error("conflict", str(e))
    except NotFoundError as e:
        return _error("not_found", str(e))
    except CorruptObjectError as e:
        log.error("export %s: %s", request, e)
        return _error("store_corrupt", f"{e} (run `lmedit store fsck`)")
    except (StoreError, ValueError, KeyError, OSError) as e:
        log.warning("export %s failed: %s", request, e)
        return _error("internal_error", f"{type(e).__name__}: {e}")
    return {"status": "succeeded", "record": record}
