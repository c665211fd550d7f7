"""``sp2ot-engine`` command line (also reached as ``sp2ot cluster|evaluate|benchmark``).

::

    sp2ot-engine cluster PATH [-k K | --k-min A --k-max B] -o labels.csv [--backbone NAME] [--checkpoint FILE]
                 [--mode fast|full] [--epochs N] [--formulation sp2ot|p2ot|pot|uot|ot]
                 [--init auto|density|spectral|kmeans|random]
                 [--batch-size N] [--input-size N] [--device auto|cpu|cuda] [--seed N]
                 [--workers N] [--save-model FILE] [--truth truth.csv] [--quiet]
    sp2ot-engine assign MODEL PATH -o assignments.csv [--device auto|cpu|cuda] [--workers N] [--quiet]
    sp2ot-engine evaluate labels.csv truth.csv [--json]
    sp2ot-engine benchmark [ARGS...]        (runs benchmarks/quality.py of a source checkout)

``PATH`` is a folder or archive (zip, tar, tar.gz, ...) of images, or a ``.npy`` file holding an
``N x d`` feature matrix (its "filenames" are then the row numbers ``0..N-1``). Without ``-k``
the number of clusters is chosen in ``--k-min..--k-max`` (:mod:`sp2ot_engine.auto_k`) and the
criterion's curve is printed. The CSV holds ``filename,cluster,confidence,outlier_score,outlier,
duplicate_of`` (:mod:`sp2ot_engine.io.labels_csv`). ``assign`` puts new images into the clusters
of a model saved by ``cluster --save-model`` without training:
``filename,cluster,confidence,outlier_score,outlier``.

Exit codes: 0 success, 2 bad usage or input (the message says what), 1 runtime failure,
130 interrupted/cancelled. User errors never print a traceback (set ``SP2OT_DEBUG=1`` to get
one for unexpected failures).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sp2ot_engine.errors import Cancelled
from sp2ot_engine.io.labels_csv import flagged_rows, name_list, read_labels, read_truth, write_assignments, write_labels
from sp2ot_engine.options import BACKBONES, FORMULATIONS, INITS, MODES, Backbone, Formulation, Init, Mode, Stage

SKIPPED_SHOWN = 20  # skipped files listed by name in the summary

# Metric keys of ``sp2ot_engine.metrics.evaluate`` in display order, with their labels.
METRIC_LABELS = (
    ("acc", "ACC"),
    ("nmi", "NMI"),
    ("f1", "F1"),
    ("ari", "ARI"),
    ("head_acc", "Head ACC"),
    ("medium_acc", "Medium ACC"),
    ("tail_acc", "Tail ACC"),
    ("instance_acc", "Instance ACC"),
)


class UsageError(Exception):
    """Bad usage or input: printed as ``error: <message>``, exit code 2."""


class _LinesFormatter(argparse.HelpFormatter):
    """Wraps each line of a help text separately, so a ``\n`` starts a new line (one per choice)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        split = super()._split_lines
        return [part for line in text.splitlines() for part in split(line, width)]


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of exiting, so ``main`` returns a code."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _LinesFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _benchmark_script() -> Path:
    """Where the quality benchmark lives in a source checkout (absent from an installed wheel)."""
    return Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("sp2ot", "sp2ot-engine") else "sp2ot-engine"


# ------------------------------------------------------------------------------ argument types


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``, described as ``what`` in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _device(text: str) -> str:
    t = text.strip().lower()
    if t in ("auto", "cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_prog(), description="SP2OT deep imbalanced image clustering (engine commands).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser(
        "cluster", help="cluster a folder/archive of images (or a .npy feature matrix) into K clusters",
        description="Cluster images with SP2OT and write filename,cluster,confidence,outlier_score,outlier,"
                    "duplicate_of to a CSV.",
    )
    c.add_argument("path", metavar="PATH",
                   help="folder or archive (zip/tar/tar.gz/...) of images, or a .npy N x d feature matrix")
    c.add_argument("-k", "--clusters", "--n-clusters", dest="k", type=_int, default=None, metavar="K",
                   help="number of clusters (2 <= K <= number of images); omit it to choose K")
    c.add_argument("--k-min", type=_int, default=None, metavar="A",
                   help="without -k: the smallest K tried (default 2)")
    c.add_argument("--k-max", type=_int, default=None, metavar="B",
                   help="without -k: the largest K tried (default N // 20, between 2 and 50)")
    c.add_argument("-o", "--output", required=True, metavar="labels.csv",
                   help="output CSV (filename,cluster,confidence,outlier_score,outlier,duplicate_of); "
                        "written atomically")
    c.add_argument("--backbone", default=Backbone.EFFICIENTNET_LITE0.value,
                   help=f"feature backbone: {', '.join(BACKBONES)} (default {Backbone.EFFICIENTNET_LITE0}), "
                        "or a timm name together with --checkpoint")
    c.add_argument("--checkpoint", default=None, metavar="FILE", help="local weight file for the backbone")
    c.add_argument("--mode", choices=MODES, default=Mode.FAST.value,
                   help="fast: frozen backbone, only the head trains (default); full: fine-tune the last block")
    c.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default 10 fast, 50 full)")
    c.add_argument("--formulation", choices=FORMULATIONS, default=Formulation.P2OT.value,
                   help="transport formulation (default p2ot: benchmarks/README.md, quality study)")
    c.add_argument("--init", choices=INITS, default=Init.AUTO.value,
                   help="where the cluster head starts (training keeps the partition it starts from):\n"
                        "auto: density and spectral, each trained; the higher silhouette wins (default)\n"
                        "density: means of the density modes (ToMATo) of the kNN graph\n"
                        "spectral: means of the spectral clusters of the kNN graph\n"
                        "kmeans: spherical k-means centroids of the features\n"
                        "random: random prototypes, as in the paper")
    c.add_argument("--batch-size", type=_positive_int, default=512, help="training batch size (default 512)")
    c.add_argument("--input-size", type=_positive_int, default=None,
                   help="backbone input resolution (default: the backbone's own, 224)")
    c.add_argument("--device", type=_device, default="auto", help="auto (default), cpu, cuda or cuda:N")
    c.add_argument("--seed", type=_int, default=0, help="random seed (default 0)")
    c.add_argument("--workers", type=_non_negative_int, default=0,
                   help="image-decoding worker processes (default 0: in the main process)")
    c.add_argument("--save-model", default=None, metavar="FILE", help="also save the fitted model here")
    c.add_argument("--truth", default=None, metavar="truth.csv",
                   help="ground truth CSV (filename,label): print the clustering metrics at the end")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    a = sub.add_parser(
        "assign", help="assign new images (or .npy rows) to the clusters of a saved model, without training",
        description="Assign new images to the clusters of a model saved by `cluster --save-model` and write "
                    "filename,cluster,confidence,outlier_score,outlier to a CSV (confidence: the model's "
                    "probability of the cluster; the outlier columns are empty when the model has no outlier rule).",
    )
    a.add_argument("model", metavar="MODEL", help="model file written by `cluster --save-model`")
    a.add_argument("path", metavar="PATH",
                   help="folder or archive of the new images, or a .npy N x d feature matrix")
    a.add_argument("-o", "--output", required=True, metavar="assignments.csv",
                   help="output CSV; written atomically")
    a.add_argument("--device", type=_device, default="auto", help="auto (default), cpu, cuda or cuda:N")
    a.add_argument("--workers", type=_non_negative_int, default=0,
                   help="image-decoding worker processes (default 0: in the main process)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "evaluate", help="score a labels CSV against a ground-truth CSV (ACC, NMI, F1, ARI, head/medium/tail)",
        description="Join labels.csv (filename,cluster[,confidence]) and truth.csv (filename,label) on "
                    "filename and print the paper's metrics as percentages.",
    )
    e.add_argument("labels", metavar="labels.csv")
    e.add_argument("truth", metavar="truth.csv")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object (metrics as fractions in [0, 1], NaN as null)")

    sub.add_parser("benchmark", add_help=False,
                   help="run the quality benchmark (benchmarks/quality.py of the source repository); "
                        "arguments are passed through")
    return p


# ------------------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning (as in app/cli.py): on a shared CPU spinning
    # threads steal the cores the busy ones need. Only effective before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "benchmark":
            return _benchmark(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return _exit_code(e.code)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return {"cluster": _cluster, "assign": _assign, "evaluate": _evaluate}[args.command](args)
    except UsageError as e:
        return _fail(str(e), 2)
    except ValueError as e:  # the engine's errors for bad input
        return _fail(str(e), 2)
    except (Cancelled, KeyboardInterrupt) as e:
        msg = str(e) if isinstance(e, Cancelled) and str(e) else "interrupted"
        return _fail(msg, 130)
    except MemoryError:
        return _fail("out of memory (try a smaller --batch-size or --input-size)", 1)
    except Exception as e:  # runtime failure: one line, no traceback unless debugging
        if os.environ.get("SP2OT_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, 1)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------ cluster


def _cluster(args) -> int:
    started = time.perf_counter()
    out = Path(args.output)
    _check_writable(out, "--output")
    if args.save_model:
        _check_writable(Path(args.save_model), "--save-model")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"checkpoint file not found: {args.checkpoint}")
    truth = read_truth(args.truth) if args.truth else None
    if not os.path.exists(args.path):
        raise UsageError(f"{args.path} does not exist")

    if args.k is not None and (args.k_min is not None or args.k_max is not None):
        raise UsageError("give either -k (the number of clusters) or --k-min/--k-max (to choose it), not both")
    if args.k_min is not None and args.k_max is not None and args.k_min > args.k_max:
        raise UsageError(f"--k-min {args.k_min} is larger than --k-max {args.k_max}")
    X = _load_matrix(Path(args.path)) if _is_npy(args.path) else args.path

    from sp2ot_engine.clustering import SP2OTClustering

    est = SP2OTClustering(
        args.k, k_min=args.k_min, k_max=args.k_max, backbone=args.backbone, checkpoint=args.checkpoint, mode=args.mode, epochs=args.epochs,
        formulation=args.formulation, init=args.init, batch_size=args.batch_size, input_size=args.input_size,
        device=args.device, num_workers=args.workers, random_state=args.seed,
    )
    with _progress(enabled=not args.quiet) as progress:
        est.fit(X, progress=progress)

    _write_labels_atomic(out, flagged_rows(est.filenames_, est.labels_, est.confidences_, est.outlier_scores_,
                                           est.outliers_, est.duplicate_of_))
    if args.save_model:
        _save_model_atomic(est, Path(args.save_model))

    _print_summary(est, out, args, time.perf_counter() - started)
    if truth is not None:
        skipped = {name for name, _ in est.skipped_}
        truth = {k: v for k, v in truth.items() if k not in skipped}
        predicted = {name: str(int(label)) for name, label in zip(est.filenames_, est.labels_)}
        try:
            metrics, n_classes, _ = _score(predicted, truth, "the clustered images", args.truth)
        except UsageError as e:
            raise UsageError(f"{e} (the labels were written to {out})") from None
        print()
        print(f"metrics against {args.truth} ({len(predicted)} images, {n_classes} classes):")
        _print_metrics(metrics)
    return 0


def _assign(args) -> int:
    started = time.perf_counter()
    out = Path(args.output)
    _check_writable(out, "--output")
    if not Path(args.model).is_file():
        raise UsageError(f"model file not found: {args.model} (write one with `cluster ... --save-model FILE`)")
    if not os.path.exists(args.path):
        raise UsageError(f"{args.path} does not exist")
    X = _load_matrix(Path(args.path)) if _is_npy(args.path) else args.path

    from sp2ot_engine.clustering import SP2OTClustering

    try:
        est = SP2OTClustering.load(args.model)
    except (KeyError, TypeError, RuntimeError, EOFError) as e:  # torch.load's errors for a file that is no model
        raise UsageError(f"{args.model} is not a model saved by `cluster --save-model` ({type(e).__name__})") from None
    est.device, est.num_workers = args.device, args.workers
    with _progress(enabled=not args.quiet) as progress:
        result = est.predict_assignments(X, progress=progress)
    _write_csv_atomic(out, lambda f: write_assignments(f, result.names, result.labels, result.confidences,
                                                         result.outlier_scores, result.outliers))
    sizes = [int((result.labels == c).sum()) for c in range(int(est.n_clusters))]
    print(f"assigned {len(result.names)} {'rows' if _is_npy(args.path) else 'images'} to the "
          f"{int(est.n_clusters)} clusters of {args.model} -> {out}")
    print("per cluster: " + " ".join(f"{i}:{n}" for i, n in enumerate(sizes)))
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s):")
        for name, reason in result.skipped[:SKIPPED_SHOWN]:
            print(f"  {name}: {reason}")
    print(f"time {time.perf_counter() - started:.1f} s")
    return 0


def _is_npy(path: str) -> bool:
    return path.lower().endswith(".npy") and os.path.isfile(path)


def _load_matrix(path: Path):
    import numpy as np

    try:
        X = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"cannot read the feature matrix {path}: {e}") from None
    if X.ndim != 2:
        raise UsageError(f"{path} must hold an N x d feature matrix (2-D), got shape {X.shape}")
    if X.dtype.kind not in "fiub":
        raise UsageError(f"{path} must hold numbers, got dtype {X.dtype}")
    return X


def _check_writable(path: Path, option: str) -> None:
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: the directory {parent} is not writable")


@contextmanager
def _atomic_path(path: Path) -> Iterator[str]:
    """A temporary file next to ``path``, renamed over it on success and removed on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_labels_atomic(path: Path, rows) -> None:
    _write_csv_atomic(path, lambda f: write_labels(f, rows))


def _write_csv_atomic(path: Path, write: Callable[[object], None]) -> None:
    """``write(f)`` to a temporary file renamed over ``path`` once synced (see :func:`_atomic_path`)."""
    with _atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())


def _save_model_atomic(est, path: Path) -> None:
    with _atomic_path(path) as tmp:
        est.save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _print_summary(est, out: Path, args, seconds: float) -> None:
    sizes = [int(s) for s in est.cluster_sizes_]
    n = len(est.filenames_)
    what = "rows" if _is_npy(args.path) else "images"
    print(f"clustered {n} {what} into {len(sizes)} clusters -> {out}")
    if est.k_curve_:
        print(f"K = {est.n_clusters_} chosen in {min(est.k_curve_)}..{max(est.k_curve_)} by {est.k_criterion_}: "
              + " ".join(f"{k}:{v:.3f}" for k, v in est.k_curve_.items()))
    print("cluster sizes: " + " ".join(f"{i}:{s}" for i, s in enumerate(sizes)))
    nonzero = [s for s in sizes if s]
    if nonzero:
        empty = len(sizes) - len(nonzero)
        print(f"largest {max(nonzero)}, smallest {min(nonzero)}" + (f", {empty} empty" if empty else ""))
    n_outliers = int(est.outliers_.sum())
    n_duplicates = int((est.duplicate_of_ >= 0).sum())
    print(f"flagged {n_outliers} outlier(s), {n_duplicates} duplicate(s) of an earlier {what[:-1]}")
    skipped = list(est.skipped_)
    if skipped:
        print(f"skipped {len(skipped)} file(s):")
        for name, reason in skipped[:SKIPPED_SHOWN]:
            print(f"  {name}: {reason}")
        if len(skipped) > SKIPPED_SHOWN:
            print(f"  ... and {len(skipped) - SKIPPED_SHOWN} more")
    else:
        print("skipped 0 files")
    if args.save_model:
        print(f"model saved to {args.save_model}")
    fit = getattr(est, "fit_seconds_", None)
    print(f"time {seconds:.1f} s" + (f" (fit {fit:.1f} s on {getattr(est, 'device_', '?')})" if fit else ""))


# ------------------------------------------------------------------------------ progress


class _Progress:
    """One tqdm bar per stage on stderr: loading, features, graph, training (epoch, loss, rho)."""

    LABELS = {stage: stage.value for stage in Stage if stage is not Stage.DONE}  # bar titles

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar = None

    def __call__(self, info: dict) -> None:
        stage = info.get("stage")
        if stage != self.stage:
            self.finish(complete=True)
            self.stage = stage
            if stage == Stage.DONE or stage is None:
                return
            self.bar = self._open(stage, info)
        bar = self.bar
        if bar is None:
            return
        if stage == Stage.TRAINING:
            if info.get("total_steps") and bar.total != info["total_steps"]:
                bar.total = info["total_steps"]
            postfix = {}
            if info.get("epoch") is not None:
                epochs = info.get("epochs")
                postfix["epoch"] = f"{info['epoch']}/{epochs}" if epochs else str(info["epoch"])
            if info.get("loss") is not None:
                postfix["loss"] = f"{info['loss']:.4f}"
            if info.get("rho") is not None:
                postfix["rho"] = f"{info['rho']:.3f}"
            bar.set_postfix(postfix, refresh=False)
            step = info.get("step")
            if step is not None and step > bar.n:
                bar.update(step - bar.n)
        else:
            pct = info.get("percent")
            if pct is not None:
                pct = min(max(float(pct), 0.0), 100.0)
                if pct > bar.n:
                    bar.update(pct - bar.n)

    def _open(self, stage: str, info: dict):
        from tqdm import tqdm

        label = self.LABELS.get(stage, stage)
        if stage == Stage.TRAINING:
            return tqdm(total=info.get("total_steps") or None, desc=label, unit="step", file=sys.stderr,
                        dynamic_ncols=True, leave=True)
        return tqdm(total=100.0, desc=label, file=sys.stderr, dynamic_ncols=True, leave=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def finish(self, complete: bool) -> None:
        if self.bar is not None:
            if complete and self.bar.total and self.bar.n < self.bar.total:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[dict], None] | None]:
    if not enabled:
        yield None
        return
    p = _Progress()
    try:
        yield p
    except BaseException:
        p.finish(complete=False)
        raise
    p.finish(complete=True)


# ------------------------------------------------------------------------------ evaluate


def _evaluate(args) -> int:
    predicted = read_labels(args.labels)
    truth = read_truth(args.truth)
    metrics, n_classes, n_clusters = _score(predicted, truth, args.labels, args.truth)
    if args.json:
        doc = {"n_samples": len(predicted), "n_classes": n_classes, "n_clusters": n_clusters}
        doc.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()})
        print(json.dumps(doc, indent=2))
    else:
        print(f"{len(predicted)} samples, {n_classes} classes, {n_clusters} clusters")
        _print_metrics(metrics)
    return 0


def _print_metrics(metrics: dict) -> None:
    width = max(len(label) for _, label in METRIC_LABELS)
    for key, label in METRIC_LABELS:
        v = metrics.get(key)
        text = "n/a" if v is None or math.isnan(v) else f"{100.0 * v:.1f}"
        print(f"{label:<{width}}  {text}")


def _as_labels(values: list[str]):
    """Integers when every value is one (so 2 < 10 as numbers), else the strings."""
    try:
        return [int(v) for v in values]
    except ValueError:
        return values


def _score(predicted: dict[str, str], truth: dict[str, str], pred_name: str, truth_name: str):
    only_pred = [k for k in predicted if k not in truth]
    only_truth = [k for k in truth if k not in predicted]
    if only_pred or only_truth:
        parts = []
        if only_pred:
            parts.append(f"{len(only_pred)} file(s) in {pred_name} are not in {truth_name}: {name_list(only_pred)}")
        if only_truth:
            parts.append(f"{len(only_truth)} file(s) in {truth_name} are not in {pred_name}: {name_list(only_truth)}")
        raise UsageError("the files do not match: " + "; ".join(parts))
    from sp2ot_engine.metrics import evaluate

    names = list(predicted)
    y_pred = _as_labels([predicted[k] for k in names])
    y_true = _as_labels([truth[k] for k in names])
    metrics = evaluate(y_true, y_pred)
    return metrics, len(set(y_true)), len(set(y_pred))


# ------------------------------------------------------------------------------ benchmark


def _benchmark(argv: list[str]) -> int:
    script = _benchmark_script()
    if not script.is_file():
        raise UsageError(
            f"the quality benchmark ships with the source repository (benchmarks/quality.py), not with the "
            f"installed package; it was not found at {script}. Clone the sp2ot repository and run "
            f"`pip install -e .` there, or run `python benchmarks/quality.py` from the checkout."
        )
    import runpy

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/quality.py` would
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return _exit_code(e.code)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
