"""Streaming ``multipart/form-data`` reception.

The request body is parsed as it arrives (``request.stream()``) and each file part is written
to its own file under the data dir's ``tmp/`` in chunks of ``upload_chunk_bytes``: memory
stays flat whatever the upload size, the size limit is enforced while receiving (413 as soon
as it is exceeded, or before reading anything when ``Content-Length`` already says so), and
nothing is copied a second time.
"""
from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anyio
try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart < 0.0.13
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]
from starlette.requests import ClientDisconnect, Request

from app.errors import ApiError, UploadRejected, UploadTooLarge, human_bytes

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64


@dataclass
class ReceivedFile:
    field: str
    filename: str
    path: Path
    size: int = 0


@dataclass
class ReceivedForm:
    """Text fields and files of a multipart request; ``workdir`` holds the files."""

    workdir: Path
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)
    received_bytes: int = 0  # the whole body

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class _Part:
    __slots__ = ("name", "filename", "data", "file", "received", "headers", "limit")

    def __init__(self) -> None:
        self.name: str | None = None
        self.filename: str | None = None
        self.data = bytearray()
        self.file: ReceivedFile | None = None
        self.received = 0
        self.headers: dict[bytes, bytes] = {}
        self.limit = 0


def too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(
        f"The upload is larger than the limit of {human_bytes(limit)} (SP2OT_MAX_UPLOAD_BYTES). "
        "Upload a smaller archive or split the images into several jobs."
    )


async def receive_multipart(
    request: Request,
    tmp_root: Path,
    *,
    max_bytes: int,
    file_fields: dict[str, int],
    text_fields: set[str],
    chunk_bytes: int = 1 << 20,
) -> ReceivedForm:
    """Parse a multipart request, files to disk. ``file_fields`` maps each accepted file field
    to its own size limit. Unknown fields are refused (422) with the list of accepted ones."""
    ctype = request.headers.get("content-type", "")
    _, params = parse_options_header(ctype)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRejected("The multipart request has no boundary. Let your HTTP client build the multipart body.")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large(max_bytes)

    workdir = tmp_root / f"upload-{uuid.uuid4().hex}"
    workdir.mkdir(parents=True)
    form = ReceivedForm(workdir=workdir)
    state = {"part": _Part(), "header_name": b"", "header_value": b"", "parts": 0}
    pending: list[tuple[_Part, bytes]] = []
    handles: dict[str, object] = {}
    accepted = sorted(set(file_fields) | text_fields)

    def on_part_begin() -> None:
        state["part"] = _Part()
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise UploadRejected(f"Too many form fields (more than {MAX_PARTS}).")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["part"].headers[state["header_name"].lower()] = state["header_value"]
        state["header_name"] = b""
        state["header_value"] = b""

    def on_headers_finished() -> None:
        part: _Part = state["part"]
        _, opts = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"name" not in opts:
            raise UploadRejected('A multipart part has no name (Content-Disposition "name" is required).')
        part.name = opts[b"name"].decode("utf-8", "replace")
        if b"filename" in opts:
            part.filename = opts[b"filename"].decode("utf-8", "replace")
            if part.name not in file_fields:
                raise UploadRejected(
                    f"Unexpected file field {part.name!r}. Send the archive in field 'archive' "
                    f"(and an optional ground-truth CSV in field 'truth'). Accepted fields: {', '.join(accepted)}."
                )
            if part.name in form.files:
                raise UploadRejected(f"The file field {part.name!r} was sent twice; send one file.")
            part.limit = file_fields[part.name]
            path = workdir / f"{part.name}.bin"
            part.file = ReceivedFile(part.name, part.filename, path)
            form.files[part.name] = part.file
        else:
            if part.name not in text_fields and part.name not in file_fields:
                raise UploadRejected(f"Unknown form field {part.name!r}. Accepted fields: {', '.join(accepted)}.")
            part.limit = MAX_FIELD_BYTES

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part: _Part = state["part"]
        n = end - start
        part.received += n
        if part.received > part.limit:
            if part.file is not None:
                if part.limit >= max_bytes:
                    raise too_large(max_bytes)
                raise UploadTooLarge(
                    f"The file in field {part.name!r} is larger than its limit of {human_bytes(part.limit)}."
                )
            raise UploadRejected(f"The form field {part.name!r} is too long (limit {MAX_FIELD_BYTES} bytes).")
        if part.file is not None:
            pending.append((part, bytes(data[start:end])))
        else:
            part.data.extend(data[start:end])

    def on_part_end() -> None:
        part: _Part = state["part"]
        if part.file is None and part.name is not None:
            if part.name in form.fields:
                raise UploadRejected(f"The form field {part.name!r} was sent twice.")
            form.fields[part.name] = part.data.decode("utf-8", "replace").strip()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )

    def flush(batch: list[tuple[_Part, bytes]]) -> None:
        for part, data in batch:
            assert part.file is not None
            fh = handles.get(part.file.field)
            if fh is None:
                fh = handles[part.file.field] = open(part.file.path, "wb")
            fh.write(data)  # type: ignore[attr-defined]
            part.file.size += len(data)

    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise too_large(max_bytes)
            parser.write(chunk)
            if pending and total - state.get("flushed_at", 0) >= chunk_bytes:
                state["flushed_at"] = total
                batch, pending[:] = list(pending), []
                await anyio.to_thread.run_sync(flush, batch)
        parser.finalize()
        if pending:
            batch, pending[:] = list(pending), []
            await anyio.to_thread.run_sync(flush, batch)
        for part_name in form.files:
            if part_name not in handles:  # an empty file part: create the (empty) file
                handles[part_name] = open(form.files[part_name].path, "wb")
    except ClientDisconnect:
        _close(handles)
        form.cleanup()
        raise ApiError("The client closed the connection before the upload finished.", 400)
    except ApiError:
        _close(handles)
        form.cleanup()
        raise
    except Exception as e:
        _close(handles)
        form.cleanup()
        if isinstance(e, OSError) and e.errno == 28:
            raise ApiError("The server has not enough free disk space to store this upload.", 507) from e
        raise UploadRejected(f"The multipart body is malformed ({e}). Let your HTTP client build it.") from e
    _close(handles)
    form.received_bytes = total
    return form


def _close(handles: dict[str, object]) -> None:
    for fh in handles.values():
        try:
            fh.close()  # type: ignore[attr-defined]
        except OSError:
            pass
