"""The labels and truth CSV formats (torch-free).

- **labels**: ``filename,cluster,confidence,outlier_score,outlier,duplicate_of``, one row per
  image, a header first; written by :func:`write_labels` / :func:`format_labels`, read by
  :func:`read_labels`. ``outlier_score`` is the modified z-score of the image's distance to the
  nearest cluster mean and ``outlier`` is ``true`` above the fit's threshold
  (:mod:`sp2ot_engine.flags`); ``duplicate_of`` is the filename of the earlier image it is a
  (near-)duplicate of, empty if none. The three flag fields are empty for rows given without
  them (a job clustered before the flags existed). With ``cluster_names`` (the service, once a
  person named or edited the clusters) a last column ``cluster_name``; readers find the columns
  by name, so every shape reads the same (files of the earlier ``filename,cluster,confidence``
  shape too).
- **assignments** (new images assigned to a fitted model's clusters, :func:`write_assignments`):
  the labels columns up to ``outlier``; :func:`read_labels` reads it too.
- **truth**: ``filename,label``; written by :func:`write_truth` (with a header), read by
  :func:`read_truth` (header optional); :func:`match_truth` matches its filenames to the
  names of a set of images (by path, or by an unambiguous base name).

One reader for both, used by the CLI, the API (truth uploads) and the worker: UTF-8 (a
byte-order mark is allowed), the delimiter sniffed among comma, semicolon and tab (a
spreadsheet's "CSV" may use either), blank lines skipped. A first row that names a column
(``filename``, ``label``, ...; case-insensitive) is the header: the columns are found by name,
in any order, other columns ignored. A truth file may have no header: then every row is
``filename,label``. It raises :class:`CsvFormatError` (a ``ValueError``) with a message that
names the file (its path, or the name the caller gives), the line and what to fix: missing
file, not UTF-8, no such column, header but no rows, a row with too few fields, an empty
filename or value, a filename given twice with different values (the same row twice is
harmless and kept once).
"""
from __future__ import annotations

import csv
import io
import itertools
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TextIO

__all__ = [
    "ASSIGNMENTS_COLUMNS",
    "CONFIDENCE_DECIMALS",
    "SCORE_DECIMALS",
    "LABELS_COLUMNS",
    "NAMED_LABELS_COLUMNS",
    "TRUTH_COLUMNS",
    "CsvFormatError",
    "flagged_rows",
    "format_labels",
    "match_truth",
    "name_list",
    "read_labels",
    "read_truth",
    "spreadsheet_text",
    "write_assignments",
    "write_labels",
    "write_truth",
]

LABELS_COLUMNS = ("filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of")
#: The labels columns with the clusters' names (see :func:`format_labels`).
NAMED_LABELS_COLUMNS = (*LABELS_COLUMNS, "cluster_name")
TRUTH_COLUMNS = ("filename", "label")
#: Digits after the decimal point of a written confidence.
CONFIDENCE_DECIMALS = 4
#: First characters that make a spreadsheet read a cell as a formula (CSV injection).
FORMULA_STARTS = frozenset("=+-@\t\r")
NAMES_SHOWN = 5  # file names listed in an error about several files
_WRITE_BATCH = 10_000
_DELIMITERS = ",;\t"
_SNIFF_BYTES = 4096

#: Digits after the decimal point of a written outlier score.
SCORE_DECIMALS = 3

#: ``(filename, cluster, confidence)`` or ``(filename, cluster, confidence, outlier_score,
#: outlier, duplicate_of)`` with ``duplicate_of`` a filename or None.
LabelRow = tuple


class CsvFormatError(ValueError):
    """A labels or truth CSV that cannot be used; the message says what to fix."""


# ------------------------------------------------------------------------------ writing


def spreadsheet_text(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would read it as a formula (it starts
    with ``= + - @``, a tab or a carriage return); other text unchanged."""
    return "'" + text if text[:1] in FORMULA_STARTS else text


def format_labels(rows: Iterable[LabelRow], *, header: bool = True, decimals: int = CONFIDENCE_DECIMALS,
                  cluster_names: Mapping[int, str] | None = None, spreadsheet_safe: bool = False) -> str:
    """``rows`` (:data:`LabelRow`: without the flags, their fields are left empty) as labels
    CSV text (``\\r\\n`` line ends, quoting where a filename needs it). With ``header=False``
    it continues an earlier chunk, so a large table can be streamed in batches. With
    ``cluster_names`` (``{cluster: name}``) a last column ``cluster_name`` (empty for a cluster
    without a name).

    Names are written exactly as they are (a join on file names must find them), unless
    ``spreadsheet_safe``: then a file or cluster name a spreadsheet would run as a formula gets
    a ``'`` in front (:func:`spreadsheet_text`), so opening the file runs nothing."""
    text = spreadsheet_text if spreadsheet_safe else str

    def fields(row: Sequence) -> list:
        name, cluster, conf = row[:3]
        out = [text(name), int(cluster), f"{float(conf):.{decimals}f}", "", "", ""]
        if len(row) > 3:
            score, outlier, dup = row[3:6]
            out[3] = "" if score is None else f"{float(score):.{SCORE_DECIMALS}f}"
            out[4] = "" if outlier is None else ("true" if outlier else "false")
            out[5] = text(dup) if dup else ""
        if cluster_names is not None:
            out.append(text(cluster_names.get(int(cluster), "")))
        return out

    columns = LABELS_COLUMNS if cluster_names is None else NAMED_LABELS_COLUMNS
    return _csv_text(columns if header else None, (fields(row) for row in rows))


def flagged_rows(filenames: Sequence[str], labels, confidences, outlier_scores, outliers,
                 duplicate_of) -> Iterable[LabelRow]:
    """The full rows of a fitted estimator's arrays: ``duplicate_of`` holds indices into
    ``filenames`` (``-1`` for none) and comes out as the earlier image's filename."""
    for i, name in enumerate(filenames):
        dup = int(duplicate_of[i])
        yield (name, int(labels[i]), float(confidences[i]), float(outlier_scores[i]), bool(outliers[i]),
               filenames[dup] if dup >= 0 else None)


def write_labels(target: str | os.PathLike | TextIO, rows: Iterable[LabelRow], *,
                 decimals: int = CONFIDENCE_DECIMALS, cluster_names: Mapping[int, str] | None = None,
                 spreadsheet_safe: bool = False) -> None:
    """Write a labels CSV (see :func:`format_labels`) to a path (created or replaced) or to an
    open text file (opened with ``newline=""``; left open, so a caller can ``fsync`` it before
    renaming)."""
    _write(target, rows, lambda batch, header: format_labels(batch, header=header, decimals=decimals,
                                                             cluster_names=cluster_names,
                                                             spreadsheet_safe=spreadsheet_safe))


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


def read_labels(path: str | os.PathLike, *, name: str | None = None) -> dict[str, str]:
    """``{filename: cluster}`` (as text) of a labels CSV (a header is required; a ``confidence``
    column is optional). ``name``: how messages call the file (default: its path)."""
    return _read_table(Path(path), LABELS_COLUMNS[:2], "labels", name=name, header_optional=False)


def read_truth(path: str | os.PathLike, *, name: str | None = None) -> dict[str, str]:
    """``{filename: label}`` of a truth CSV ``filename,label`` (header optional). ``name``: how
    messages call the file (default: its path; the API gives the uploaded file's name)."""
    return _read_table(Path(path), TRUTH_COLUMNS, "truth", name=name, header_optional=True)


def match_truth(truth: dict[str, str], image_names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Truth labels keyed by the image names they belong to, and the truth filenames that match
    no image. A filename matches an image by its path (``\\`` read as ``/``, a leading ``./``
    dropped) or, when it has no folder part, by a base name that only one image has. Raises
    :class:`CsvFormatError` when two filenames match one image with different labels."""
    by_path = set(image_names)
    by_base: dict[str, str | None] = {}
    for image in image_names:
        base = image.rsplit("/", 1)[-1]
        by_base[base] = None if base in by_base else image  # None: ambiguous
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for filename, label in truth.items():
        key = filename.replace("\\", "/")
        while key.startswith("./"):
            key = key[2:]
        image = key if key in by_path else (by_base.get(key) if "/" not in key else None)
        if image is None:
            unmatched.append(filename)
        elif matched.setdefault(image, label) != label:
            raise CsvFormatError(f"the truth gives two labels for the image {image!r} ({matched[image]!r} and "
                                 f"{label!r}, from {filename!r})")
    return matched, unmatched


def _read_rows(path: Path, what: str) -> list[list[str]]:
    """The non-blank rows of a CSV file, its delimiter sniffed."""
    if not path.exists():
        raise CsvFormatError(f"{what} does not exist")
    if not path.is_file():
        raise CsvFormatError(f"{what} is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(_SNIFF_BYTES)
            f.seek(0)
            try:
                dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=_DELIMITERS)
            except csv.Error:
                dialect = csv.excel
            rows = list(csv.reader(f, dialect))
    except UnicodeDecodeError:
        raise CsvFormatError(f"{what} is not a UTF-8 text CSV") from None
    except csv.Error as e:
        raise CsvFormatError(f"{what} is not a valid CSV: {e}") from None
    except OSError as e:
        raise CsvFormatError(f"cannot read {what}: {e.strerror or e}") from None
    return [r for r in rows if any(cell.strip() for cell in r)]


def _read_table(path: Path, columns: Sequence[str], kind: str, *, name: str | None,
                header_optional: bool) -> dict[str, str]:
    """``{filename: value of columns[1]}`` from a CSV whose header names ``columns`` (or, when
    ``header_optional``, whose rows are exactly ``columns`` without a header)."""
    what = f"{kind} file {path if name is None else name}"
    shape = ",".join(columns)
    rows = _read_rows(path, what)
    if not rows:
        raise CsvFormatError(f"{what} is empty (expected " + ("lines " if header_optional else "a header ")
                             + f"{shape})")
    header = [h.strip().lower() for h in rows[0]]
    if any(h in columns for h in header):
        missing = [c for c in columns if c not in header]
        if missing:
            raise CsvFormatError(f"{what} has no column {', '.join(repr(m) for m in missing)} "
                                 f"(header: {','.join(rows[0])}; expected {shape})")
        i_name, i_value = header.index(columns[0]), header.index(columns[1])
        data, first_line, n_fields = rows[1:], 2, len(header)
        if not data:
            raise CsvFormatError(f"{what} has a header but no rows")
    elif header_optional:
        i_name, i_value = 0, 1
        data, first_line, n_fields = rows, 1, len(columns)
    else:
        raise CsvFormatError(f"{what} has no header naming the columns {shape} (first line: {','.join(rows[0])})")
    headerless = first_line == 1
    table: dict[str, str] = {}
    conflicting: dict[str, None] = {}  # ordered set
    for line, r in enumerate(data, start=first_line):
        if len(r) <= max(i_name, i_value) or (headerless and len(r) != n_fields):
            raise CsvFormatError(f"{what}, line {line}: expected {n_fields} fields ({shape}), got {len(r)}")
        filename, value = r[i_name].strip(), r[i_value].strip()
        if not filename:
            raise CsvFormatError(f"{what}, line {line}: empty {columns[0]}")
        if not value:
            raise CsvFormatError(f"{what}, line {line}: empty {columns[1]} for {filename}")
        if table.setdefault(filename, value) != value:
            conflicting[filename] = None
    if conflicting:
        raise CsvFormatError(f"{what}: {len(conflicting)} duplicated filename(s): {name_list(list(conflicting))} "
                             f"(each with different {columns[1]}s)")
    return table


def name_list(names: Sequence[str], n: int = NAMES_SHOWN) -> str:
    """The first ``n`` of ``names`` (sorted), comma-separated, with a count of the rest."""
    names = sorted(names)
    text = ", ".join(names[:n])
    return text + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ------------------------------------------------------------------- assignments of new images

#: Columns of an assignments CSV (new images assigned to a fitted model's clusters): the labels
#: columns, then ``outlier_score`` and ``outlier`` (``true``/``false``; both empty when the model
#: has no outlier rule).
ASSIGNMENTS_COLUMNS = LABELS_COLUMNS[:5]  # filename .. outlier: no earlier image of the fit to duplicate


def write_assignments(target: str | os.PathLike | TextIO, names: Sequence[str], labels: Sequence[int],
                      confidences: Sequence[float], outlier_scores: Sequence[float] | None = None,
                      outliers: Sequence[bool] | None = None, *, decimals: int = CONFIDENCE_DECIMALS) -> None:
    """Write an assignments CSV (:data:`ASSIGNMENTS_COLUMNS`), like :func:`write_labels`."""
    def rows():
        for i, (name, cluster, conf) in enumerate(zip(names, labels, confidences)):
            score = "" if outlier_scores is None else f"{float(outlier_scores[i]):.{decimals}f}"
            flag = "" if outliers is None else ("true" if outliers[i] else "false")
            yield name, int(cluster), f"{float(conf):.{decimals}f}", score, flag

    _write(target, rows(), lambda batch, header: _csv_text(ASSIGNMENTS_COLUMNS if header else None, batch))
