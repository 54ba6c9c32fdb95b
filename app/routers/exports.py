"""GET /versions/{name}/export?format=hf|gguf|peft: a version's weights for other engines.

The API has no torch: a worker job (workers/protocol.py EXPORT) writes the export into the store
(editing/export.py: content-addressed files plus a record), and this route streams it from there in
1 MiB chunks, never whole in memory. `gguf` is one file (application/octet-stream); `hf` and `peft`
are folders, streamed as an uncompressed tar built on the fly (safetensors does not compress), with
one top folder `lmedit-<version[:12]>-<format>/`. Both carry a Content-Length.

What a curl user gets: `curl -fo model.gguf URL` waits (up to `wait` seconds, default 60) while the
worker writes a new export, then receives the file; a version already exported streams at once. An
export that takes longer answers 202 with the job id, a Retry-After and a Location to request again:
the same command later gives the file. Clients that prefer to poll pass `wait=0`.
"""

from __future__ import annotations

import asyncio
import tarfile
import time
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from rq.job import Job, JobStatus
from starlette.concurrency import run_in_threadpool

from app.deps import EditKey, ServicesDep
from app.errors import ApiError, Conflict, NotFound, QueueFull, Unavailable
from editing.export import FOLDER_FORMATS, ExportError, low_rank_chain, open_blob, read_record
from workers import protocol

router = APIRouter(tags=["versions"])
Format = Literal["hf", "gguf", "peft"]
CHUNK = 1 << 20
POLL_S = 0.25
RETRY_AFTER_S = 5
RESULT_TTL_S = 3600  # a finished job's answer; the export itself stays in the store for good
WAITING = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)


class ExportPending(BaseModel):
    job_id: str
    status: Literal["queued", "running"]
    version: str
    format: Format
    retry_after: int


class ExportFailed(ApiError):
    status, code = 503, "export_failed"  # its worker died, or the job raised: a later request runs it again


class StoreCorrupt(ApiError):
    status, code = 503, "store_corrupt"


_JOB_ERRORS = {"conflict": Conflict, "not_found": NotFound, "store_corrupt": StoreCorrupt}
BINARY = {"schema": {"type": "string", "format": "binary"}}
RESPONSES = {
    200: {"description": "the export: a .gguf file, or a tar of the hf / peft folder",
          "content": {"application/octet-stream": BINARY, "application/x-tar": BINARY}},
    202: {"model": ExportPending, "description": "the worker is still writing it: request again after Retry-After"},
    401: {"description": "missing or invalid key"}, 403: {"description": "key lacks the edit scope"},
    404: {"description": "unknown version"},
    409: {"description": "not exportable in this format (a dense delta as peft; a base that is not a GGUF as gguf)"},
    429: {"description": "queue full (Retry-After)"},
    503: {"description": "no worker serves the edits queue, or the store is unreadable"},
}


def job_id(version: str, fmt: str) -> str:
    """One job per (version, format): concurrent requests share it."""
    return f"export-{version}-{fmt}"


def _ensure_job(services, version: str, fmt: str) -> Job | None:
    """The export job that is queued or running (enqueued if there is none), or None if one has just
    succeeded (its record is in the store). A failed one raises its error and is forgotten, so a later
    request tries again."""
    jobs = services.jobs
    job = jobs.fetch(job_id(version, fmt))
    if job is not None:
        status = job.get_status(refresh=False)
        if status in WAITING or status == JobStatus.STARTED:
            return job
        result = job.return_value() if status == JobStatus.FINISHED else None
        job.delete()
        if isinstance(result, dict) and result.get("status") == "succeeded":
            return None
        if isinstance(result, dict) and result.get("error"):
            error = result["error"]
            raise _JOB_ERRORS.get(error.get("code"), ExportFailed)(error.get("message") or "the export failed")
        if status == JobStatus.FAILED:  # an exception the job did not catch, or its worker died
            raise ExportFailed(f"the export job of {version} as {fmt} failed; request it again to retry")
    if not jobs.live_workers(protocol.EDITS_QUEUE):
        raise Unavailable("no live worker serves the edits queue, where exports run (start one: lmedit worker)",
                          {"Retry-After": str(services.settings.retry_after_s)})
    if jobs.depth(jobs.edits) >= services.settings.max_edit_queue_depth:
        raise QueueFull("the edits queue is full; retry later", {"Retry-After": str(services.settings.retry_after_s)})
    return jobs.edits.enqueue_call(
        protocol.EXPORT, args=[{"version": version, "format": fmt}], job_id=job_id(version, fmt),
        timeout=services.settings.edit_timeout_s, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
        meta={"kind": "export", "version": version, "format": fmt}, description=f"export {version} {fmt}",
    )


def _blob_chunks(store, sha: str) -> Iterator[bytes]:
    with open_blob(store, sha) as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _tar_stream(store, record: dict, top: str) -> tuple[int, Iterator[bytes]]:
    """(size, chunks) of a ustar/pax archive of the record's files under `top`/, read from the store as
    they are sent: a header block per file (tarfile's own), the bytes, zero padding to 512, two zero blocks."""
    headers = []
    for f in record["files"]:
        info = tarfile.TarInfo(f"{top}/{f['name']}")
        info.size, info.mode, info.mtime = f["bytes"], 0o644, int(time.time())
        headers.append(info.tobuf(tarfile.PAX_FORMAT))
    pads = [-f["bytes"] % tarfile.BLOCKSIZE for f in record["files"]]
    size = sum(len(h) + f["bytes"] + p for h, f, p in zip(headers, record["files"], pads)) + 2 * tarfile.BLOCKSIZE

    def chunks() -> Iterator[bytes]:
        for header, f, pad in zip(headers, record["files"], pads):
            yield header
            yield from _blob_chunks(store, f["sha256"])
            yield b"\0" * pad
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    return size, chunks()


def _stream(store, record: dict, version: str, fmt: str) -> StreamingResponse:
    headers = {"X-Lmedit-Version": version}
    if fmt in FOLDER_FORMATS:
        top = f"lmedit-{version[:12]}-{fmt}"
        size, body = _tar_stream(store, record, top)
        headers |= {"Content-Disposition": f'attachment; filename="{top}.tar"', "Content-Length": str(size)}
        return StreamingResponse(body, media_type="application/x-tar", headers=headers)
    (f,) = record["files"]
    headers |= {"Content-Disposition": f'attachment; filename="lmedit-{version[:12]}.gguf"',
                "Content-Length": str(f["bytes"]), "ETag": f'"{f["sha256"]}"'}
    return StreamingResponse(_blob_chunks(store, f["sha256"]), media_type="application/octet-stream",
                             headers=headers)


@router.get("/versions/{name}/export", response_class=Response, responses=RESPONSES,
            summary="Download a version's weights for other engines")
async def export_version(
    name: str, request: Request, services: ServicesDep, principal: EditKey,
    format: Annotated[Format, Query(description="hf: merged safetensors folder (tar); gguf: one file for "
                                                "llama.cpp / Ollama; peft: LoRA adapter folder (tar)")],
    wait: Annotated[float, Query(ge=0, le=600, description="Seconds to wait for a new export before "
                                                           "answering 202")] = 60,
) -> Response:
    """`name`: a version id, tag, branch or `base`. The first request has a worker write the export into the
    store (reused by every later one); it waits up to `wait` seconds, then answers 202 (request again)."""
    store = services.store()
    vid = await run_in_threadpool(store.resolve, name)
    if format == "peft":
        try:
            await run_in_threadpool(low_rank_chain, store, vid)
        except ExportError as e:
            raise Conflict(str(e)) from None
    deadline = time.monotonic() + wait
    while True:
        record = await run_in_threadpool(read_record, store, vid, format)
        if record is not None:
            return _stream(store, record, vid, format)
        job = await run_in_threadpool(_ensure_job, services, vid, format)
        if job is not None and time.monotonic() >= deadline:
            status = "running" if job.get_status(refresh=False) == JobStatus.STARTED else "queued"
            body = ExportPending(job_id=job.id, status=status, version=vid, format=format, retry_after=RETRY_AFTER_S)
            return JSONResponse(body.model_dump(), status_code=202, headers={
                "Retry-After": str(RETRY_AFTER_S), "Location": str(request.url)})
        await asyncio.sleep(POLL_S)
