"""Where member bytes come from: a folder, a zip, or a tar (compressed tars spooled to disk).

Torch-free and Pillow-free. A source reads one member at a time by its *key* (folder: the
relative name; zip: the offset of the member's local header; tar: ``(offset, size)`` of the data in the
uncompressed tar) through handles opened lazily in each process, so sources pickle cheaply
(path + kind) and work in ``DataLoader`` worker processes started with fork or spawn.
A compressed tar has no random access: it is decompressed once into a temporary ``.tar``
file, owned by the source that made it and deleted by ``close()`` / garbage collection /
interpreter exit in the creating process only.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import tempfile
import threading
import weakref
import zipfile
import zlib
from typing import BinaryIO, Callable, Union

#: What a key looks like: a name (folder), a local header offset (zip) or ``(offset, size)`` (tar).
Key = Union[str, int, tuple[int, int]]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_COMPRESSED_TAR = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
_SPOOL_CHUNK = 1 << 20


def sniff_kind(path: str) -> str:
    """``"zip"``, ``"tar"``, ``"gz"``, ``"bz2"``, ``"xz"`` (a compressed stream, a tar inside
    or not) or ``"unknown"``, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in _ZIP_MAGIC:
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"  # e.g. a self-extracting archive
    try:
        if len(head) >= 512 and tarfile.is_tarfile(path):
            return "tar"  # old v7 tar without the ustar magic
    except Exception:
        pass
    return "unknown"


def spool(path: str, compression: str, cache_dir: str | os.PathLike | None,
          on_bytes: Callable[[int], None] | None = None) -> str:
    """Decompress ``path`` into a new temporary file and return its path.

    ``on_bytes(total)`` sees the running decompressed size after every chunk; it may raise to
    stop (an archive bomb), and the partial file is removed. A corrupt stream raises ValueError.
    """
    opener = _COMPRESSED_TAR[compression]
    fd, tmp = tempfile.mkstemp(prefix="sp2ot-images-", suffix=".tar", dir=cache_dir)
    total = 0
    try:
        with os.fdopen(fd, "wb") as out, opener(path, "rb") as src:
            while True:
                try:
                    chunk = src.read(_SPOOL_CHUNK)
                except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
                    raise ValueError(f"cannot decompress ({compression}): {e}") from e
                if not chunk:
                    break
                total += len(chunk)
                if on_bytes is not None:
                    on_bytes(total)
                out.write(chunk)  # disk errors propagate as OSError, unchanged
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


class FolderSource:
    """Files below a folder, read by their relative POSIX name."""

    kind = "folder"

    def __init__(self, root: str):
        self.path = root

    def open(self, key: Key) -> BinaryIO:
        return open(os.path.join(self.path, *str(key).split("/")), "rb")

    def read(self, key: Key) -> bytes:
        with self.open(key) as f:
            return f.read()

    def close(self) -> None:
        pass


class _PerProcessHandle:
    """A handle opened on first use in each process (a forked child must not share its
    parent's file position), guarded by a lock for threads."""

    def __init__(self) -> None:
        self._handle = None
        self._pid = -1
        self.lock = threading.Lock()

    def get(self, opener: Callable):
        if self._handle is None or self._pid != os.getpid():
            with self.lock:
                if self._handle is None or self._pid != os.getpid():
                    self._handle = opener()
                    self._pid = os.getpid()
        return self._handle

    def release(self, closer: Callable) -> None:
        if self._handle is not None and self._pid == os.getpid():
            try:
                closer(self._handle)
            except OSError:
                pass
        self._handle = None


class ZipSource:
    """Members of a zip archive, read by the offset of their local header (unique, unlike a
    name: with duplicated names, reading by name would give the last copy, not the first)."""

    kind = "zip"

    def __init__(self, path: str):
        self.path = path
        self._zf = _PerProcessHandle()

    def _open_zip(self) -> tuple[zipfile.ZipFile, dict[int, zipfile.ZipInfo]]:
        zf = zipfile.ZipFile(self.path)
        return zf, {info.header_offset: info for info in zf.infolist()}

    def _member(self, key: Key) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
        zf, by_offset = self._zf.get(self._open_zip)
        try:
            return zf, by_offset[key]  # type: ignore[index]
        except KeyError:
            raise OSError(f"no zip member at offset {key!r}: the archive changed since it was scanned") from None

    def open(self, key: Key) -> BinaryIO:
        zf, info = self._member(key)
        return zf.open(info)

    def read(self, key: Key) -> bytes:
        zf, info = self._member(key)
        return zf.read(info)

    def close(self) -> None:
        self._zf.release(lambda handle: handle[0].close())

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _remove_if_owner(path: str, pid: int) -> None:
    if os.getpid() == pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class TarSource:
    """Members of a plain (uncompressed) tar, read by ``(offset, size)`` with ``os.pread``.

    ``original`` is the archive the caller named (a compressed tar) when ``path`` is its spool
    file; ``owned`` spool files are deleted on ``close()`` by the process that made them.
    """

    def __init__(self, path: str, *, original: str | None = None, kind: str = "tar", owned: bool = False):
        self.path = path
        self.original = original or path
        self.kind = kind
        self._fd = _PerProcessHandle()
        self._finalizer = weakref.finalize(self, _remove_if_owner, path, os.getpid()) if owned else None

    def _handle(self) -> int:
        return self._fd.get(lambda: os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)))

    def open(self, key: Key) -> BinaryIO:
        offset, size = key  # type: ignore[misc]
        return _Window(self.path, offset, size)

    def read(self, key: Key) -> bytes:
        offset, size = key  # type: ignore[misc]
        fd = self._handle()
        if hasattr(os, "pread"):
            chunks, done = [], 0
            while done < size:
                chunk = os.pread(fd, size - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
            data = b"".join(chunks)
        else:  # pragma: no cover - Windows
            with self._fd.lock:
                os.lseek(fd, offset, os.SEEK_SET)
                data = os.read(fd, size)
        if len(data) != size:
            raise OSError(f"archive member is truncated ({len(data)} of {size} bytes present)")
        return data

    def close(self) -> None:
        self._fd.release(os.close)
        if self._finalizer is not None:
            self._finalizer()  # deletes the spool file only in the creating process

    def __getstate__(self):
        # The spool file stays owned by the creating process: copies never delete it.
        return {"path": self.path, "original": self.original, "kind": self.kind}

    def __setstate__(self, state):
        self.__init__(state["path"], original=state["original"], kind=state["kind"])


class _Window:
    """A read-only, seekable file over ``size`` bytes at ``offset`` of a file (one tar member)."""

    def __init__(self, path: str, offset: int, size: int):
        self._f = open(path, "rb")
        self._start, self._size, self._pos = offset, size, 0

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "_Window":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Source = Union[FolderSource, ZipSource, TarSource]
