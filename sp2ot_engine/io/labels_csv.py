"""The labels and truth CSV formats (torch-free).

- **labels**: ``filename,cluster,confidence``, one row per image, a header first; written by
  :func:`write_labels` / :func:`format_labels`, read by :func:`read_labels`.
- **truth**: ``filename,label``, a header first; written by :func:`write_truth`, read by
  :func:`read_truth`.

Readers take UTF-8 (a byte-order mark is allowed), find the columns by their header names
(case-insensitive, in any order, other columns ignored), skip blank lines and raise
:class:`CsvFormatError` (a ``ValueError``) with a message that names the file, the line and
what to fix: missing file, not UTF-8, no such column, header but no rows, a short row, an
empty filename or value, duplicated filenames.
"""
from __future__ import annotations

import csv
import io
import itertools
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

__all__ = [
    "CONFIDENCE_DECIMALS",
    "LABELS_COLUMNS",
    "TRUTH_COLUMNS",
    "CsvFormatError",
    "format_labels",
    "name_list",
    "read_labels",
    "read_truth",
    "write_labels",
    "write_truth",
]

LABELS_COLUMNS = ("filename", "cluster", "confidence")
TRUTH_COLUMNS = ("filename", "label")
#: Digits after the decimal point of a written confidence.
CONFIDENCE_DECIMALS = 4
NAMES_SHOWN = 5  # file names listed in an error about several files
_WRITE_BATCH = 10_000

LabelRow = tuple[str, int, float]


class CsvFormatError(ValueError):
    """A labels or truth CSV that cannot be used; the message says what to fix."""


# ------------------------------------------------------------------------------ writing


def format_labels(rows: Iterable[LabelRow], *, header: bool = True, decimals: int = CONFIDENCE_DECIMALS) -> str:
    """``rows`` of ``(filename, cluster, confidence)`` as labels CSV text (``\\r\\n`` line ends,
    quoting where a filename needs it). With ``header=False`` it continues an earlier chunk, so
    a large table can be streamed in batches."""
    return _csv_text(LABELS_COLUMNS if header else None,
                     ((name, int(cluster), f"{float(conf):.{decimals}f}") for name, cluster, conf in rows))


def write_labels(target: str | os.PathLike | TextIO, rows: Iterable[LabelRow], *,
                 decimals: int = CONFIDENCE_DECIMALS) -> None:
    """Write a labels CSV to a path (created or replaced) or to an open text file (opened with
    ``newline=""``; left open, so a caller can ``fsync`` it before renaming)."""
    _write(target, rows, lambda batch, header: format_labels(batch, header=header, decimals=decimals))


def write_truth(target: str | os.PathLike | TextIO, rows: Iterable[tuple[str, str | int]]) -> None:
    """Write a truth CSV of ``(filename, label)`` rows, like :func:`write_labels`."""
    _write(target, rows, lambda batch, header: _csv_text(TRUTH_COLUMNS if header else None, batch))


def _csv_text(header: Sequence[str] | None, rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    if header is not None:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write(target: str | os.PathLike | TextIO, rows: Iterable, chunk: Callable[[list, bool], str]) -> None:
    """``chunk(batch, header)`` of the rows in batches, to a path or an open text file."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "w", newline="", encoding="utf-8") as f:
            _write(f, rows, chunk)
        return
    rows = iter(rows)
    header = True
    while True:  # in batches: memory stays flat whatever the number of rows
        batch = list(itertools.islice(rows, _WRITE_BATCH))
        if not batch and not header:
            return
        target.write(chunk(batch, header))
        header = False


# ------------------------------------------------------------------------------ reading


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """``{filename: cluster}`` (as text) of a labels CSV; a ``confidence`` column is optional."""
    return _read_table(Path(path), LABELS_COLUMNS[:2], "labels")


def read_truth(path: str | os.PathLike) -> dict[str, str]:
    """``{filename: label}`` of a truth CSV ``filename,label``."""
    return _read_table(Path(path), TRUTH_COLUMNS, "truth")


def _read_table(path: Path, columns: Sequence[str], kind: str) -> dict[str, str]:
    """``{filename: value of columns[1]}`` from a CSV with a header naming ``columns``."""
    if not path.exists():
        raise CsvFormatError(f"{kind} file {path} does not exist")
    if not path.is_file():
        raise CsvFormatError(f"{kind} file {path} is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise CsvFormatError(f"{kind} file {path} is not a UTF-8 text CSV") from None
    except csv.Error as e:
        raise CsvFormatError(f"{kind} file {path} is not a valid CSV: {e}") from None
    except OSError as e:
        raise CsvFormatError(f"cannot read {kind} file {path}: {e.strerror or e}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise CsvFormatError(f"{kind} file {path} is empty (expected a header {','.join(columns)})")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise CsvFormatError(f"{kind} file {path} has no column {', '.join(repr(m) for m in missing)} "
                             f"(header: {','.join(rows[0])}; expected {','.join(columns)})")
    i_name, i_value = header.index(columns[0]), header.index(columns[1])
    data = rows[1:]
    if not data:
        raise CsvFormatError(f"{kind} file {path} has a header but no rows")
    table: dict[str, str] = {}
    duplicates: list[str] = []
    for line, r in enumerate(data, start=2):
        if len(r) <= max(i_name, i_value):
            raise CsvFormatError(f"{kind} file {path}, line {line}: expected {len(header)} fields, got {len(r)}")
        name, value = r[i_name].strip(), r[i_value].strip()
        if not name:
            raise CsvFormatError(f"{kind} file {path}, line {line}: empty {columns[0]}")
        if not value:
            raise CsvFormatError(f"{kind} file {path}, line {line}: empty {columns[1]} for {name}")
        if name in table:
            duplicates.append(name)
            continue
        table[name] = value
    if duplicates:
        raise CsvFormatError(f"{kind} file {path}: {len(duplicates)} duplicated filename(s): {name_list(duplicates)}")
    return table


def name_list(names: Sequence[str], n: int = NAMES_SHOWN) -> str:
    """The first ``n`` of ``names`` (sorted), comma-separated, with a count of the rest."""
    names = sorted(names)
    text = ", ".join(names[:n])
    return text + (f", ... ({len(names) - n} more)" if len(names) > n else "")
