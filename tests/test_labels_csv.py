"""sp2ot_engine.io.labels_csv: the labels and truth CSV formats (the CLI's error messages are
checked end to end in test_cli.py)."""
from __future__ import annotations

import io
import re

import pytest

from sp2ot_engine.io.labels_csv import (
    CsvFormatError,
    format_labels,
    match_truth,
    read_labels,
    read_truth,
    write_labels,
    write_truth,
)


def test_labels_round_trip_with_awkward_names(tmp_path):
    rows = [("a.png", 0, 0.91234), ("dir/b, with comma.png", 3, 1.0), ('quote".jpg', 12, 0.00004), ("日本.png", 1, 0.5)]
    path = tmp_path / "labels.csv"
    write_labels(path, rows)
    text = path.read_bytes().decode("utf-8")
    # rows without the flags (a job clustered before they existed): their fields are empty
    assert text.startswith("filename,cluster,confidence,outlier_score,outlier,duplicate_of\r\na.png,0,0.9123,,,\r\n")
    assert read_labels(path) == {name: str(cluster) for name, cluster, _ in rows}


def test_streamed_chunks_equal_one_file(tmp_path):
    rows = [(f"{i}.png", i % 3, i / 100) for i in range(25)]
    chunks = format_labels(rows[:10]) + format_labels(rows[10:], header=False)
    buf = io.StringIO(newline="")
    write_labels(buf, rows)
    assert buf.getvalue() == chunks == format_labels(rows)
    assert format_labels([], decimals=6) == "filename,cluster,confidence,outlier_score,outlier,duplicate_of\r\n"
    assert format_labels([("x", 1, 0.5)], header=False, decimals=6) == "x,1,0.500000,,,\r\n"


def test_labels_with_cluster_names_read_the_same(tmp_path):
    """The service's curated labels.csv: a last column cluster_name, read like the others."""
    rows = [("a.png", 0, 0.5), ("b, c.png", 2, 0.25), ("d.png", 1, 1.0)]
    names = {0: "cats", 2: 'big "dogs", mostly'}
    text = format_labels(rows, cluster_names=names)
    assert text == ('filename,cluster,confidence,outlier_score,outlier,duplicate_of,cluster_name\r\na.png,0,0.5000,,,,cats\r\n'
                    '"b, c.png",2,0.2500,,,,"big ""dogs"", mostly"\r\nd.png,1,1.0000,,,,\r\n')
    assert format_labels(rows[:1], cluster_names=names) + format_labels(rows[1:], header=False,
                                                                         cluster_names=names) == text
    write_labels(tmp_path / "named.csv", rows, cluster_names=names)
    write_labels(tmp_path / "plain.csv", rows)
    assert (tmp_path / "named.csv").read_text(encoding="utf-8").replace("\r\n", "\n") == text.replace("\r\n", "\n")
    assert read_labels(tmp_path / "named.csv") == read_labels(tmp_path / "plain.csv") == \
        {"a.png": "0", "b, c.png": "2", "d.png": "1"}


def test_flag_columns_name_the_earlier_image_and_read_like_the_old_shape(tmp_path):
    """The estimator's arrays as rows: duplicate_of indices become the earlier image's name, the
    outlier flag true/false, the score 3 decimals; read_labels reads the old 3-column files the same."""
    import numpy as np

    from sp2ot_engine.io.labels_csv import flagged_rows

    names = ["a.png", "b, c.png", "d.png"]
    rows = list(flagged_rows(names, np.array([0, 1, 0]), np.array([0.9, 0.8, 0.7]), np.array([0.25, 5.0, -1.0]),
                             np.array([False, True, False]), np.array([-1, -1, 0])))
    write_labels(tmp_path / "flags.csv", rows)
    assert (tmp_path / "flags.csv").read_text(encoding="utf-8").splitlines() == [
        "filename,cluster,confidence,outlier_score,outlier,duplicate_of",
        "a.png,0,0.9000,0.250,false,", '"b, c.png",1,0.8000,5.000,true,', "d.png,0,0.7000,-1.000,false,a.png"]
    (tmp_path / "old.csv").write_text('filename,cluster,confidence\na.png,0,0.9\n"b, c.png",1,0.8\nd.png,0,0.7\n',
                                      encoding="utf-8")
    assert read_labels(tmp_path / "flags.csv") == read_labels(tmp_path / "old.csv") == \
        {"a.png": "0", "b, c.png": "1", "d.png": "0"}


def test_truth_round_trip(tmp_path):
    write_truth(tmp_path / "truth.csv", [("a.png", 3), ("b, c.png", "cat")])
    assert (tmp_path / "truth.csv").read_bytes() == b'filename,label\r\na.png,3\r\n"b, c.png",cat\r\n'
    assert read_truth(tmp_path / "truth.csv") == {"a.png": "3", "b, c.png": "cat"}


def test_truth_reading_and_its_errors(tmp_path):
    good = tmp_path / "truth.csv"
    good.write_bytes("\ufeffLabel,Filename,extra\r\ncat,a.png,1\r\n\r\ndog,b.png,2\r\n".encode("utf-8"))
    assert read_truth(good) == {"a.png": "cat", "b.png": "dog"}
    cases = {
        "filename,label\na,x\na,y\n": "1 duplicated filename(s): a",
        "filename,label\n,x\n": "line 2: empty filename",
        "name,label\na,x\n": "no column 'filename'",
        "filename,label\n": "has a header but no rows",
        "": "is empty",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.csv"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(CsvFormatError, match=re.escape(message)):
            read_truth(bad)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"filename,label\n\xe9.png,x\n")
    with pytest.raises(CsvFormatError, match="not a UTF-8 text CSV"):
        read_truth(latin)
    with pytest.raises(ValueError, match="does not exist"):
        read_truth(tmp_path / "missing.csv")


def test_truth_header_is_optional_and_the_delimiter_is_sniffed(tmp_path):
    """The leniency the API's truth upload had, now the one reader's: no header, `;` or tab,
    the same row twice."""
    cases = {
        "a.png,cat\nb.png,dog\n": {"a.png": "cat", "b.png": "dog"},
        "filename;label\na.png;cat\nb, c.png;dog\n": {"a.png": "cat", "b, c.png": "dog"},
        "a.png\tcat\nb.png\tdog\na.png\tcat\n": {"a.png": "cat", "b.png": "dog"},
    }
    for text, expected in cases.items():
        path = tmp_path / "t.csv"
        path.write_text(text, encoding="utf-8")
        assert read_truth(path) == expected, text
    bad = tmp_path / "bad.csv"
    bad.write_text("one,two,three\n", encoding="utf-8")
    with pytest.raises(CsvFormatError, match=re.escape("truth file 'mine.csv', line 1: expected 2 fields "
                                                       "(filename,label), got 3")):
        read_truth(bad, name="'mine.csv'")
    bad.write_text("filename,label\na,x\na,y\na,z\n", encoding="utf-8")
    with pytest.raises(CsvFormatError, match=re.escape("1 duplicated filename(s): a (each with different labels)")):
        read_truth(bad)
    bad.write_text("a.png,1,0.5\n", encoding="utf-8")
    with pytest.raises(CsvFormatError, match="no header naming the columns filename,cluster"):
        read_labels(bad)  # a labels file keeps its header


def test_match_truth_by_path_or_unambiguous_base_name():
    images = ["shapes/a.png", "shapes/b.png", "x/c.png", "y/c.png", "d.png"]
    truth = {"shapes/a.png": "1", "b.png": "2", "c.png": "3", ".\\d.png": "4", "other.png": "5", "z/b.png": "6"}
    matched, unmatched = match_truth(truth, images)
    assert matched == {"shapes/a.png": "1", "shapes/b.png": "2", "d.png": "4"}
    assert unmatched == ["c.png", "other.png", "z/b.png"]  # c.png is ambiguous
    assert match_truth({"a.png": "1", "shapes/a.png": "1"}, images)[0] == {"shapes/a.png": "1"}
    with pytest.raises(CsvFormatError, match="two labels for the image 'shapes/a.png'"):
        match_truth({"a.png": "1", "shapes/a.png": "2"}, images)
