"""``SP2OTClustering``: deep imbalanced clustering of images (or any feature matrix).

A scikit-learn estimator (``fit``, ``predict``, ``fit_predict``; parameters in ``__init__``,
checked by ``_parameter_constraints`` when ``fit`` starts; fitted attributes end in ``_``;
``random_state``; ``check_estimator`` passes on feature matrices, see
``tests/test_sklearn_conformance.py``) around the SP2OT training of :mod:`sp2ot_engine.training`.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from sp2ot_engine.auto_k import choose_k, k_range
from sp2ot_engine.errors import Cancelled
from sp2ot_engine.flags import (DUPLICATE_THRESHOLD, OUTLIER_THRESHOLD, OutlierRule, duplicate_of, fit_outlier_rule,
                                perceptual_hash_int64)
from sp2ot_engine.io.archive import Manifest, upload_of_manifest
from sp2ot_engine.io.collection import ImageCollection
from sp2ot_engine.options import FORMULATIONS, INITS, KERNELS, MODES, PROGRESS_FIELDS, RHO_SCHEDULES
from sp2ot_engine.starts import mean_silhouette
from sp2ot_engine.training import (
    CosineHead,
    TrainConfig,
    assignment_confidence,
    feature_batches,
    predict_logits,
    train_head,
)

DEFAULT_EPOCHS = {"fast": 10, "full": 50}
#: The starts ``init="auto"`` refines and chooses between (by silhouette).
AUTO_STARTS = ("density", "spectral")
#: Trained starts whose silhouettes differ by less than this are tied: the one whose start had
#: the higher silhouette before training wins. Ties on the benchmark sets differ by <= 0.0005
#: and flip with the seed; real wins by >= 0.0075 (``benchmarks/README.md``).
SILHOUETTE_TIE = 0.002

ProgressFn = Callable[[dict], None]


def spherical_kmeans(features: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``k`` unit-norm centroids of the L2-normalised features (faiss, 5 restarts).

    faiss trains on at most ``max_points_per_centroid * k`` rows, a random subset it draws with
    ``rand_perm(seed)``. The same subset is drawn here first and only it is normalised, so the
    result is faiss' on all rows without a normalised copy of all ``N`` rows.
    """
    import faiss

    km = faiss.Kmeans(features.shape[1], k, niter=25, nredo=5, seed=seed, spherical=True, verbose=False)
    n, cap = features.shape[0], k * km.cp.max_points_per_centroid
    if n > cap:
        perm = np.empty(n, dtype=np.int32)
        faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
        features = features[torch.from_numpy(perm[:cap]).long()]
    km.train(torch.nn.functional.normalize(features.float(), dim=1).numpy())
    return torch.from_numpy(km.centroids.copy())


def _is_images(x: Any) -> bool:
    """A folder, archive or manifest path, or an :class:`ImageCollection` (else: a feature matrix)."""
    return isinstance(x, (str, os.PathLike, ImageCollection))


def _seed(random_state) -> int:
    """The integer seed of a fit: an int ``random_state`` is the seed itself (so a seed gives the
    same run as before ``random_state`` replaced ``seed``); None or a ``RandomState`` draws one."""
    if isinstance(random_state, Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """torch's global generator seeded for the block and restored after it: torchvision's random
    augmentations (full mode, in this process) draw from it and take no generator."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class SP2OTClustering(ClusterMixin, BaseEstimator):
    """Imbalance-aware clustering by SP2OT pseudo-label training (Zhang, Ren & He).

    Parameters:
        n_clusters: number of clusters ``K`` (>= 2), or None to choose it in ``k_min..k_max``
            before training (:func:`sp2ot_engine.auto_k.choose_k`: the spectral partitions of
            the cosine kNN graph scored by their modularity on the graph).
        k_min, k_max: the range ``K`` is chosen in when ``n_clusters`` is None (default
            ``2`` and ``clip(N // 20, 2, 50)``: clusters of 20 images on average at the most,
            :func:`sp2ot_engine.auto_k.default_k_range`); ignored when ``n_clusters`` is given.
        backbone: feature backbone for images (``"efficientnet_lite0"``, ``"dino_vitb16"``,
            ``"dino_vits16"`` or a timm name with ``checkpoint``); ignored for feature matrices.
        checkpoint: local weight file for the backbone.
        mode: ``"fast"`` (frozen backbone, cached features, only the head trains) or
            ``"full"`` (the paper's: the backbone's last block is fine-tuned on augmented views).
        epochs: training epochs (default 10 fast, 50 full; per start: ``init="auto"`` trains two).
        formulation: ``"p2ot"`` (default: from the graph starts it scores as well as ``"sp2ot"``,
            within the seed spread or better, on every benchmark set, in a third of the time;
            ``benchmarks/README.md``),
            ``"sp2ot"`` (the paper's, with the kNN-graph term), ``"pot"``, ``"uot"`` or ``"ot"``.
        batch_size, bank_batches: batch size and memory-bank length in batches.
        lr, lr_min: Adam learning rate, cosine-decayed to ``lr_min``.
        rho0, rho_schedule: curriculum start and shape (see :func:`sp2ot_engine.ot.rho_schedule`).
        eps, lam, lam_s: entropic regularisation, column-KL weight, semantic strength ``lam_0``.
        knn, sigma, kernel: kNN graph of the initial features (SP2OT).
        input_size: backbone input resolution (default: the backbone's own).
        init: where the head's prototypes start (:mod:`sp2ot_engine.starts`): ``"density"``
            (the means of the ToMATo modes of the cosine kNN graph), ``"spectral"`` (the means
            of its spectral clusters), ``"auto"`` (default: both are trained and the result
            with the higher mean silhouette is kept; in full mode the start with the higher
            silhouette is trained alone), ``"kmeans"`` (spherical k-means centroids) or
            ``"random"`` (the paper's). Training keeps the partition it starts from, and k-means
            splits large classes and merges small ones: ``benchmarks/README.md`` has the study.
            A graph start that cannot be made (fewer density modes than ``K``) falls back to the
            other, then to k-means; ``start_notes_`` says so.
        outlier_threshold: modified z-score above which an image is an outlier
            (:func:`sp2ot_engine.flags.outlier_scores`; default 3.5).
        duplicate_threshold: cosine similarity of the features from which an image is a
            near-duplicate of an earlier one (:func:`sp2ot_engine.flags.duplicate_of`; default
            chosen with ``benchmarks/near_duplicates.py``). Fitted on images, two images with
            similarity at least ``flags.DUPLICATE_HASH_THRESHOLD`` whose perceptual hashes
            differ in at most ``flags.DUPLICATE_MAX_HAMMING`` bits are near-duplicates as well.
        background: colour transparent pixels are flattened onto.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        num_workers: image-decoding worker processes.
        random_state: an int seed (default 0; runs are deterministic on CPU for a given int),
            None or a ``numpy.random.RandomState``. ``fit`` seeds its own generators from it and
            leaves the global torch and numpy generators as they were.

    Fitted attributes:
        labels_ (``N``), confidences_ (``N``, each sample's transport mass on its cluster),
        cluster_sizes_ (``K``), filenames_ (``N`` names; ``"0".."N-1"`` for matrices),
        skipped_ (``(name, reason)`` of unreadable files), history_ (per-epoch loss and rho),
        best_epoch_, n_features_in_ (features per sample: the backbone's for images),
        fitted_on_ (``"images"`` or ``"features"``), fit_seconds_, features_ (``N x d`` float32: the
        features the labels were predicted from, e.g. for a 2-D map of the images), start_ (the
        start the kept result was trained from), start_scores_ (mean cosine silhouette of each
        trained start's labels, with ``init="auto"``), start_notes_ (why a start was not used),
        n_clusters_ (the ``K`` used: ``n_clusters`` or the chosen one), k_curve_ (``{K: criterion}``
        of the tried ``K`` when ``n_clusters`` is None, else ``{}``), k_criterion_ (its name or None),
        outlier_scores_ (``N`` modified z-scores of the distance to the nearest cluster mean),
        outliers_ (``N`` booleans: score above ``outlier_threshold``), duplicate_of_ (``N`` ints:
        the index of the earlier image each one duplicates, ``-1`` for none), image_hashes_ (``N``
        uint64 perceptual hashes of the decoded images, None when fitted on features).
    """

    _parameter_constraints: dict = {
        "n_clusters": [Interval(Integral, 2, None, closed="left"), None],
        "k_min": [Interval(Integral, 2, None, closed="left"), None],
        "k_max": [Interval(Integral, 2, None, closed="left"), None],
        "backbone": [str],
        "checkpoint": [str, os.PathLike, None],
        "mode": [StrOptions(set(MODES))],
        "epochs": [Interval(Integral, 1, None, closed="left"), None],
        "formulation": [StrOptions(set(FORMULATIONS))],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "bank_batches": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "lr_min": [Interval(Real, 0, None, closed="left")],
        "rho0": [Interval(Real, 0, 1, closed="right")],
        "rho_schedule": [StrOptions(set(RHO_SCHEDULES))],
        "eps": [Interval(Real, 0, None, closed="neither")],
        "lam": [Interval(Real, 0, None, closed="neither")],
        "lam_s": [Interval(Real, 0, None, closed="left")],
        "knn": [Interval(Integral, 1, None, closed="left")],
        "sigma": [Interval(Real, 0, None, closed="neither")],
        "kernel": [StrOptions(set(KERNELS))],
        "input_size": [Interval(Integral, 1, None, closed="left"), None],
        "init": [StrOptions(set(INITS))],
        "outlier_threshold": [Interval(Real, 0, None, closed="neither")],
        "duplicate_threshold": [Interval(Real, -1, 1, closed="right")],
        "background": [str, tuple, list],
        "device": [str],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, n_clusters: int | None = 10, *, k_min: int | None = None, k_max: int | None = None,
                 backbone: str = "efficientnet_lite0", checkpoint: str | None = None,
                 mode: str = "fast", epochs: int | None = None, formulation: str = "p2ot", batch_size: int = 512,
                 bank_batches: int = 10, lr: float = 5e-4, lr_min: float = 5e-6, rho0: float = 0.1,
                 rho_schedule: str = "sigmoid", eps: float = 0.1, lam: float = 1.0, lam_s: float = 1000.0,
                 knn: int = 20, sigma: float = 2.0, kernel: str = "gaussian", input_size: int | None = None,
                 init: str = "auto", outlier_threshold: float = OUTLIER_THRESHOLD,
                 duplicate_threshold: float = DUPLICATE_THRESHOLD, background: str = "white", device: str = "auto",
                 num_workers: int = 0,
                 random_state: int | np.random.RandomState | None = 0) -> None:
        self.n_clusters = n_clusters
        self.k_min = k_min
        self.k_max = k_max
        self.backbone = backbone
        self.checkpoint = checkpoint
        self.mode = mode
        self.epochs = epochs
        self.formulation = formulation
        self.batch_size = batch_size
        self.bank_batches = bank_batches
        self.lr = lr
        self.lr_min = lr_min
        self.rho0 = rho0
        self.rho_schedule = rho_schedule
        self.eps = eps
        self.lam = lam
        self.lam_s = lam_s
        self.knn = knn
        self.sigma = sigma
        self.kernel = kernel
        self.input_size = input_size
        self.init = init
        self.outlier_threshold = outlier_threshold
        self.duplicate_threshold = duplicate_threshold
        self.background = background
        self.device = device
        self.num_workers = num_workers
        self.random_state = random_state

    # ------------------------------------------------------------------------------ checks

    def _config(self, n: int, seed: int) -> TrainConfig:
        epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.mode]
        return TrainConfig(n_clusters=int(self.n_clusters_), epochs=int(epochs), batch_size=min(self.batch_size, n),
                           bank_batches=self.bank_batches, lr=self.lr, lr_min=self.lr_min, rho0=self.rho0,
                           rho_kind=self.rho_schedule, eps=self.eps, lam=self.lam, lam_s0=self.lam_s,
                           formulation=self.formulation, seed=seed)

    # ------------------------------------------------------------------------------ fit

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] | None = None) -> "SP2OTClustering":
        """Cluster ``X``: images (a folder or archive path; a manifest path ``*.manifest.json``
        written by :meth:`sp2ot_engine.io.archive.Manifest.write` next to its archive, read
        without scanning again; or an :class:`~sp2ot_engine.io.collection.ImageCollection`,
        used as it is and left open), or an ``N x d`` feature matrix.

        ``progress(info)`` receives a dict with every key of
        :data:`sp2ot_engine.options.PROGRESS_FIELDS`; ``should_stop()`` is polled between steps
        and raises :class:`Cancelled` when True. Raises ``ValueError`` for bad input (no
        readable image, ``K`` larger than ``N``, ...).
        """
        t_start = time.perf_counter()
        if self.n_clusters is None and self.k_min is not None and self.k_max is not None and self.k_min > self.k_max:
            raise ValueError(f"k_min={self.k_min} is larger than k_max={self.k_max}: give k_min <= k_max")
        report = _Reporter(progress)
        seed = _seed(self.random_state)
        from sp2ot_engine.backbones import resolve_device

        device = resolve_device(self.device)
        self.device_ = str(device)

        backbone = collection = None
        owns_collection = False
        if _is_images(X):
            collection, owns_collection = self._scan(X, report)
            backbone = self._make_backbone(device)
            features, self.image_hashes_ = self._extract(backbone, collection, device, report, should_stop,
                                                         with_hashes=True)
            self.filenames_ = list(collection.names)
            self.skipped_ = list(collection.skipped)
            self.fitted_on_ = "images"
            self.n_features_in_ = int(features.shape[1])
        else:
            features = self._as_features(X, reset=True)
            self.image_hashes_ = None  # no decoded images: the feature rule alone flags duplicates
            self.filenames_ = [str(i) for i in range(features.shape[0])]
            self.skipped_ = []
            self.fitted_on_ = "features"
        n = features.shape[0]
        if self.n_clusters is not None and self.n_clusters > n:
            raise ValueError(f"n_clusters={self.n_clusters} is larger than the number of samples ({n}): "
                             f"ask for at most {n} clusters")
        if self.n_clusters is None:
            k_bounds = k_range(n, self.k_min, self.k_max)  # bad ranges fail before any graph is built

        plan = list(AUTO_STARTS) if self.init == "auto" else [str(self.init)]
        self.start_notes_ = []
        start_graph, graph = self._graphs(features, plan, report, device)
        self.k_curve_, self.k_criterion_ = {}, None
        if self.n_clusters is None:
            self.n_clusters_ = self._choose_k(features, start_graph, k_bounds, seed, report)
        else:
            self.n_clusters_ = int(self.n_clusters)
        cfg = self._config(n, seed)
        starts = self._start_prototypes(features, plan, start_graph, seed, report)
        encoder, compared = None, []
        if self.mode == "full" and backbone is not None and len(starts) > 1:
            # full mode trains one start: the one that wins when both are trained in fast mode first
            fast_cfg = replace(cfg, epochs=DEFAULT_EPOCHS["fast"])
            fast_batches, fast_steps = feature_batches(features, cfg.batch_size, seed)
            compared = self._train_starts(starts, fast_cfg, None, fast_batches, fast_steps, features, graph, device,
                                          None, should_stop, seed)
            best = _best_start(compared)
            self.start_notes_.append(
                f"full mode trains one start: {best[3]}, the better when the starts were trained in fast mode first "
                f"(silhouettes {', '.join(f'{t[3]} {t[0]:.3f}' for t in compared)})")
            starts = [starts[best[2]]]
        if self.mode == "fast" or backbone is None:
            batches, steps = feature_batches(features, cfg.batch_size, seed)
        else:
            batches, steps, encoder = self._image_batches(collection, backbone, cfg, device)
        trained = self._train_starts(starts, cfg, encoder, batches, steps, features, graph, device, report,
                                     should_stop, seed)
        _, _, _, self.start_, head, result = _best_start(trained)
        self.start_scores_ = {t[3]: t[0] for t in (trained if len(trained) > 1 else compared)}
        if encoder is not None and result.encoder_state is not None:
            encoder.load_state_dict(result.encoder_state)
            features = self._extract(encoder, collection, device, report, should_stop, stage="predicting")
        report({"stage": "predicting", "percent": 0.0})
        logits = predict_logits(head, features, device)
        self.labels_ = logits.argmax(dim=1).numpy().astype(np.int64)
        self.confidences_ = assignment_confidence(logits, self.labels_, cfg)
        self.cluster_sizes_ = np.bincount(self.labels_, minlength=cfg.n_clusters)
        self.features_ = features.detach().cpu().numpy()  # a view of the tensor: no copy
        self.outlier_rule_ = fit_outlier_rule(self.features_, self.labels_)
        self.outlier_scores_ = self.outlier_rule_.scores(self.features_)
        self.outliers_ = self.outlier_scores_ > self.outlier_threshold
        self.duplicate_of_ = (duplicate_of(start_graph, self.duplicate_threshold, hashes=self.image_hashes_)
                              if start_graph is not None else np.full(n, -1, dtype=np.int64))
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.head_state_ = {k: v.detach().cpu() for k, v in head.state_dict().items()}
        self.encoder_state_ = None
        if encoder is not None:
            self.encoder_state_ = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        self.fit_seconds_ = time.perf_counter() - t_start
        report({"stage": "done", "percent": 100.0})
        if owns_collection:
            collection.close()
        return self

    def fit_predict(self, X, y=None, **kwargs) -> np.ndarray:
        """Fit and return ``labels_``."""
        return self.fit(X, y, **kwargs).labels_

    def predict(self, X) -> np.ndarray:
        """The fitted cluster (argmax of the head) of each row of a feature matrix ``X``
        (``N``), or of each image of a folder/archive/manifest/collection, in the order of its
        sorted names (:meth:`predict_images` returns the names too). Changes nothing."""
        return self._predict_logits(X)[0].argmax(dim=1).numpy().astype(np.int64)

    def predict_images(self, X) -> tuple[list[str], np.ndarray]:
        """``(names, labels)`` of the images of ``X`` (a folder, archive, manifest path or
        :class:`~sp2ot_engine.io.collection.ImageCollection`): the names of the images
        predicted (unreadable files are left out) and their clusters."""
        if not _is_images(X):
            raise ValueError("predict_images takes images (a folder, archive, manifest or ImageCollection); "
                             "use predict for a feature matrix")
        logits, names = self._predict_logits(X)
        return names, logits.argmax(dim=1).numpy().astype(np.int64)

    def predict_assignments(self, X, *, progress: ProgressFn | None = None) -> "Assignments":
        """Assign new samples to the fitted clusters without training: images (as
        :meth:`predict_images` takes them) or a feature matrix. Returns :class:`Assignments`:
        names, clusters, confidences (the head's softmax probability of the chosen cluster,
        ``N`` in ``[0, 1]``: a handful of new images has no transport problem of its own, so
        not the fit's transport mass), the files skipped, and outlier scores and flags when the
        model has an outlier rule (:meth:`_outliers_of`). ``progress`` as in :meth:`fit`
        (stages ``loading``, ``features``, ``predicting``). Changes nothing."""
        logits, names, features, skipped = self._predict_logits(X, _Reporter(progress), with_features=True)
        labels = logits.argmax(dim=1).numpy().astype(np.int64)
        confidences = torch.softmax(logits.double(), dim=1).max(dim=1).values.numpy()
        outliers = self._outliers_of(features, logits)
        if names is None:
            names = [str(i) for i in range(len(labels))]
        _Reporter(progress)({"stage": "done", "percent": 100.0})
        return Assignments(names=names, labels=labels, confidences=confidences, skipped=skipped,
                           outlier_scores=None if outliers is None else outliers[0],
                           outliers=None if outliers is None else outliers[1])

    def _outliers_of(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """``(scores, flags)`` (``N`` floats, ``N`` bools) of new samples by the rule the fit used
        for its own images (:class:`~sp2ot_engine.flags.OutlierRule`), or None for a model
        saved without one."""
        rule = getattr(self, "outlier_rule_", None)
        if rule is None:
            return None
        scores = rule.scores(features.detach().cpu().numpy())
        return scores, scores > self.outlier_threshold

    def _predict_logits(self, X, report: "_Reporter | None" = None, *, with_features: bool = False):
        """Head logits (``N x K``) and, for images, their names; ``with_features``: also the
        ``N x d`` features and the skipped files."""
        check_is_fitted(self)
        from sp2ot_engine.backbones import resolve_device

        report = report or _Reporter(None)
        device = resolve_device(self.device)
        names = None
        skipped: list[tuple[str, str]] = []
        if _is_images(X):
            if getattr(self, "fitted_on_", "images") != "images":
                raise ValueError("this model was fitted on a feature matrix: pass features, not images")
            collection, owns_collection = self._scan(X, report)
            try:
                backbone = self._make_backbone(device)
                if self.encoder_state_ is not None:
                    backbone.load_state_dict(self.encoder_state_)
                features = self._extract(backbone, collection, device, report, None)
                names = list(collection.names)
                skipped = list(collection.skipped)
            finally:
                if owns_collection:
                    collection.close()
        else:
            features = self._as_features(X, reset=False)
        report({"stage": "predicting", "percent": 0.0})
        head = CosineHead(self.n_features_in_, self._fitted_k(), generator=torch.Generator())
        head.load_state_dict(self.head_state_)
        logits = predict_logits(head.to(device), features, device)
        return (logits, names, features, skipped) if with_features else (logits, names)

    # ------------------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Save parameters and fitted state (``torch.save``; reload with :meth:`load`). A
        ``RandomState`` as ``random_state`` is saved as None (the file holds plain values only)."""
        check_is_fitted(self)
        params = self.get_params()
        if not isinstance(params["random_state"], (Integral, type(None))):
            params["random_state"] = None
        state = {"params": params, "head_state": self.head_state_, "encoder_state": self.encoder_state_,
                 "n_features_in": self.n_features_in_, "cluster_sizes": self.cluster_sizes_.tolist(),
                 "fitted_on": getattr(self, "fitted_on_", "images"), "n_clusters": self._fitted_k(), "version": 1,
                 "outlier_rule": {k: torch.from_numpy(v) for k, v in self.outlier_rule_.as_arrays().items()}
                 if getattr(self, "outlier_rule_", None) is not None else None}
        torch.save(state, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SP2OTClustering":
        """Load a model saved with :meth:`save`; it can ``predict`` new images or features."""
        if not Path(path).is_file():
            raise ValueError(f"model file not found: {path}")
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        params = dict(state["params"])
        if "seed" in params:  # saved before random_state replaced seed
            params["random_state"] = params.pop("seed")
        est = cls(**params)
        est.head_state_ = state["head_state"]
        est.encoder_state_ = state["encoder_state"]
        est.n_features_in_ = state["n_features_in"]
        est.cluster_sizes_ = np.asarray(state["cluster_sizes"])
        est.fitted_on_ = state["fitted_on"]
        est.n_clusters_ = int(state.get("n_clusters") or len(est.cluster_sizes_))
        rule = state.get("outlier_rule")
        est.outlier_rule_ = OutlierRule(**{k: v.numpy() for k, v in rule.items()}) if rule else None
        return est

    # ------------------------------------------------------------------------------ helpers

    def _as_features(self, X, *, reset: bool) -> torch.Tensor:
        """``X`` checked by scikit-learn's ``validate_data`` (2-D, finite, numeric; to fit
        (``reset``) at least 2 rows, and it sets ``n_features_in_``, else it checks it) as float32."""
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        x = validate_data(self, X, dtype=np.float32, order="C", ensure_min_samples=2 if reset else 1, reset=reset)
        return torch.from_numpy(x if x.flags.writeable else x.copy())

    def _fitted_k(self) -> int:
        """The ``K`` of the fitted head (``n_clusters_``; a model saved before it: ``n_clusters``)."""
        return int(getattr(self, "n_clusters_", None) or self.n_clusters)

    def _choose_k(self, features: torch.Tensor, graph, k_bounds: tuple[int, int], seed: int,
                  report: "_Reporter") -> int:
        """``K`` chosen on the cosine kNN graph (sets ``k_curve_`` and ``k_criterion_``)."""
        if graph is None:
            raise ValueError("n_clusters=None chooses K on the cosine kNN graph, which cannot be built when "
                             "some features are all zero: give n_clusters")
        report({"stage": "starts", "percent": 0.0})
        choice = choose_k(graph, features.numpy(), *k_bounds, random_state=seed)
        self.k_curve_ = {int(k): float(v) for k, v in choice.curve.items()}
        self.k_criterion_ = choice.criterion
        return choice.k

    def _scan(self, X, report: "_Reporter") -> tuple[ImageCollection, bool]:
        """The images of ``X`` and whether they are this call's to close: an
        :class:`ImageCollection` as given (the caller's); a manifest path read with the upload
        next to it, every image decoded once (damaged pixel data is skipped, as a scan does); a
        folder or archive scanned."""
        from sp2ot_engine.io.collection import scan_images

        report({"stage": "loading", "percent": 0.0})

        def loading(done: int, total: int) -> None:
            report({"stage": "loading", "percent": 100.0 * done / max(total, 1)})

        upload = None if isinstance(X, ImageCollection) else upload_of_manifest(X)
        if isinstance(X, ImageCollection):
            collection, owned = X, False
        elif upload is not None and os.path.isfile(X):
            collection = ImageCollection.from_manifest(upload, Manifest.read(X), background=self.background,
                                                       verify=True, progress=loading)
            owned = True
        else:
            collection, owned = scan_images(X, background=self.background, progress=loading), True
        if len(collection) == 0:
            if owned:
                collection.close()
            reasons = "; ".join(f"{n}: {r}" for n, r in collection.skipped[:5])
            raise ValueError(f"no readable image in {collection.source}"
                             + (f" (skipped: {reasons})" if reasons else ""))
        return collection, owned

    def _graphs(self, features: torch.Tensor, plan: list[str], report: "_Reporter", device: torch.device):
        """The cosine kNN graph (the graph starts, the choice of ``K`` and the duplicate flags
        use it; None when some features are all zero) and the graph of SP2OT's semantic term
        (the same one when ``kernel="cosine"``; None for the other formulations)."""
        from sp2ot_engine.graph import knn_graph

        n = features.shape[0]
        k = min(self.knn, n - 1)
        where = device if device.type == "cuda" else "cpu"
        start_graph = graph = None
        has_zero_rows = bool((torch.linalg.vector_norm(features, dim=1) == 0).any())
        if has_zero_rows:
            # a cosine graph has no edge for an all-zero feature: use k-means, and the Gaussian kernel
            self.start_notes_.append("some features are all zero: no cosine kNN graph, so no graph start "
                                     "and no duplicate flags")
            if any(s in ("density", "spectral") for s in plan):
                plan[:] = ["kmeans"]
        else:
            report({"stage": "graph", "percent": 0.0})
            start_graph = knn_graph(features, k=k, kernel="cosine", device=where)
        if self.formulation == "sp2ot":
            report({"stage": "graph", "percent": 50.0})
            kernel = self.kernel if start_graph is not None or self.kernel != "cosine" else "gaussian"
            graph = start_graph if kernel == "cosine" else knn_graph(features, k=k, kernel=kernel, sigma=self.sigma,
                                                                     device=where)
        return start_graph, graph

    def _train_starts(self, starts, cfg: TrainConfig, encoder, batches, steps: int, features: torch.Tensor, graph,
                      device: torch.device, report: "_Reporter | None", should_stop, seed: int) -> list[tuple]:
        """Train a head from each start; ``(silhouette, start silhouette, index, name, head,
        result)`` per start (silhouettes only when there are several to choose from)."""
        trained = []
        for i, (name, prototypes, start_score) in enumerate(starts):
            head = CosineHead(features.shape[1], cfg.n_clusters, generator=torch.Generator().manual_seed(seed))
            if prototypes is not None:
                head.weight.data.copy_(prototypes)
            head = head.to(device)
            progress = _share_of_training(report, i, len(starts)) if report is not None else None
            with _seeded_global_rng(seed, device) if encoder is not None else contextlib.nullcontext():
                result = train_head(cfg, encoder, head, batches, steps, graph, device, progress=progress,
                                    should_stop=should_stop)
            head.load_state_dict(result.head_state)
            score = 0.0
            if len(starts) > 1:
                labels = predict_logits(head, features, device).argmax(dim=1).numpy()
                # the same points for every start and every seed: a paired comparison, not sampling noise
                score = mean_silhouette(features.numpy(), labels, random_state=0)
            trained.append((score, start_score, i, name, head, result))
        return trained

    def _start_prototypes(self, features: torch.Tensor, plan: list[str], graph, seed: int,
                          report: "_Reporter") -> list[tuple[str, torch.Tensor | None, float]]:
        """``(start, K x d prototypes or None for random, silhouette of the start's own
        partition or 0)`` for each start of ``plan`` that can be made; k-means when none can."""
        from sp2ot_engine.starts import FewModes, density_modes, partition_means, spectral_partition

        k = int(self.n_clusters_)
        out = []
        for i, name in enumerate(plan):
            report({"stage": "starts", "percent": 100.0 * i / len(plan)})
            if name == "random":
                out.append((name, None, 0.0))
                continue
            if name == "kmeans":
                out.append((name, spherical_kmeans(features, k, seed), 0.0))
                continue
            x = features.numpy()
            try:
                labels = density_modes(graph, k) if name == "density" else spectral_partition(graph, k, seed)
            except FewModes as e:
                self.start_notes_.append(f"{name} start not used: {e}")
                continue
            score = mean_silhouette(x, labels, random_state=0) if len(plan) > 1 else 0.0
            out.append((name, torch.from_numpy(partition_means(x, labels, k)), score))
        if not out:
            self.start_notes_.append("started from spherical k-means instead")
            out.append(("kmeans", spherical_kmeans(features, k, seed), 0.0))
        return out

    def _make_backbone(self, device: torch.device):
        from sp2ot_engine.backbones import create_backbone

        bb = create_backbone(self.backbone, checkpoint=self.checkpoint, device=device, input_size=self.input_size)
        if self.mode == "fast":
            bb.freeze_all()
        return bb

    def _extract(self, backbone, collection, device, report: "_Reporter", should_stop, stage: str = "features",
                 with_hashes: bool = False):
        """The ``N x d`` features of the collection; with ``with_hashes``, ``(features, hashes)``
        with the ``N`` uint64 perceptual hashes of the same decoded images."""
        from sp2ot_engine.backbones import extract_features
        from sp2ot_engine.io.loader import ImageDataset
        from sp2ot_engine.transforms import eval_transform

        dataset = ImageDataset(collection, eval_transform(backbone.input_size, backbone.mean, backbone.std),
                               image_hash=perceptual_hash_int64 if with_hashes else None)
        hashes = np.zeros(len(collection), dtype=np.int64) if with_hashes else None

        def keep_hashes(index: torch.Tensor, extras: tuple) -> None:
            hashes[index.numpy()] = extras[0].numpy()

        def on_batch(done: int, total: int) -> None:
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled during feature extraction")
            report({"stage": stage, "percent": 100.0 * done / max(total, 1)})

        batch = 64 if device.type == "cpu" else 256
        features = extract_features(backbone, dataset, batch_size=batch, num_workers=self.num_workers, device=device,
                                    progress=on_batch, on_extras=keep_hashes if with_hashes else None)
        return (features, hashes.view(np.uint64)) if with_hashes else features

    def _image_batches(self, collection, backbone, cfg: TrainConfig, device):
        from sp2ot_engine.io.loader import ImageDataset, make_loader
        from sp2ot_engine.transforms import TwoViews, train_transform

        aug = train_transform(backbone.input_size, backbone.mean, backbone.std)
        dataset = _TwoViewDataset(ImageDataset(collection, TwoViews(aug)))
        loader = make_loader(dataset, cfg.batch_size, shuffle=True, num_workers=self.num_workers, seed=cfg.seed,
                             drop_last=len(dataset) > cfg.batch_size, device=device)
        backbone.unfreeze_last_block()

        def batches(epoch: int):
            for (view_a, view_b), index in loader:
                yield index, view_a, view_b

        return batches, len(loader), backbone


@dataclass
class Assignments:
    """New samples assigned to a fitted model's clusters (:meth:`SP2OTClustering.predict_assignments`):
    ``names`` (``N``; row numbers for a feature matrix), ``labels`` (``N`` int64), ``confidences``
    (``N`` in ``[0, 1]``), ``skipped`` (``(name, reason)`` of unreadable files), and
    ``outlier_scores`` / ``outliers`` (``N``) or None when the model has no outlier rule."""

    names: list[str]
    labels: np.ndarray
    confidences: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    outlier_scores: np.ndarray | None = None
    outliers: np.ndarray | None = None


class _TwoViewDataset(torch.utils.data.Dataset):
    """``((view_a, view_b), index)`` items, as the training loop consumes them."""

    returns_index = True

    def __init__(self, inner) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


def _share_of_training(report: "_Reporter", i: int, m: int) -> ProgressFn:
    """The training progress of the ``i``-th of ``m`` trainings as its share of the whole stage."""
    def share(info: dict) -> None:
        if info.get("stage") == "training" and info.get("percent") is not None:
            info = {**info, "percent": (100.0 * i + info["percent"]) / m}
        report(info)
    return share


def _best_start(trained: list[tuple]) -> tuple:
    """The trained start ``(silhouette, start silhouette, index, ...)`` with the highest
    silhouette; among those within :data:`SILHOUETTE_TIE` of it, the one whose start scored
    higher before training (deterministic, where the trained scores flip with the seed)."""
    top = max(t[0] for t in trained)
    tied = [t for t in trained if t[0] >= top - SILHOUETTE_TIE]
    return max(tied, key=lambda t: (t[1], -t[2]))


class _Reporter:
    """Fills in every progress field (:data:`sp2ot_engine.options.PROGRESS_FIELDS`) so every
    consumer sees the same shape."""

    def __init__(self, fn: ProgressFn | None) -> None:
        self.fn = fn

    def __call__(self, info: dict) -> None:
        if self.fn is not None:
            self.fn({k: info.get(k) for k in PROGRESS_FIELDS} | info)
