"""``SP2OTClustering``: deep imbalanced clustering of images (or any feature matrix).

A scikit-learn style estimator (``fit``, ``predict``, ``fit_predict``; parameters in
``__init__``; fitted attributes end in ``_``) around the SP2OT training of
:mod:`sp2ot_engine.training`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin

from sp2ot_engine.errors import Cancelled
from sp2ot_engine.graph import all_finite
from sp2ot_engine.options import TRANSPORT_FORMULATIONS as FORMULATIONS
from sp2ot_engine.ot import rho_schedule
from sp2ot_engine.training import (
    CosineHead,
    TrainConfig,
    assignment_confidence,
    feature_batches,
    predict_logits,
    train_head,
)

MODES = ("fast", "full")
ALL_FORMULATIONS = ("sp2ot", *FORMULATIONS)
DEFAULT_EPOCHS = {"fast": 30, "full": 50}
AUTO_INIT_STEPS = 200

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


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


class SP2OTClustering(ClusterMixin, BaseEstimator):
    """Imbalance-aware clustering by SP2OT pseudo-label training (Zhang, Ren & He).

    Parameters:
        n_clusters: number of clusters ``K`` (>= 2).
        backbone: feature backbone for images (``"efficientnet_lite0"``, ``"dino_vitb16"``,
            ``"dino_vits16"`` or a timm name with ``checkpoint``); ignored for feature matrices.
        checkpoint: local weight file for the backbone.
        mode: ``"fast"`` (frozen backbone, cached features, only the head trains) or
            ``"full"`` (the paper's: the backbone's last block is fine-tuned on augmented views).
        epochs: training epochs (default 30 fast, 50 full).
        formulation: ``"sp2ot"`` (default), ``"p2ot"``, ``"pot"``, ``"uot"`` or ``"ot"``.
        batch_size, bank_batches: batch size and memory-bank length in batches.
        lr, lr_min: Adam learning rate, cosine-decayed to ``lr_min``.
        rho0, rho_schedule: curriculum start and shape (see :func:`sp2ot_engine.ot.rho_schedule`).
        eps, lam, lam_s: entropic regularisation, column-KL weight, semantic strength ``lam_0``.
        knn, sigma, kernel: kNN graph of the initial features (SP2OT).
        input_size: backbone input resolution (default: the backbone's own).
        init: cluster-head prototypes: ``"random"`` (the paper's), ``"kmeans"`` (spherical
            k-means of the features) or ``"auto"`` (default): random when training has at
            least ``AUTO_INIT_STEPS`` steps, k-means below that, where a random head gets too
            few steps to form clusters (measured: ``tests/test_clustering.py`` blobs, ACC 0.49
            random vs > 0.9 k-means at 45 steps; Fashion-MNIST-LT, 290 steps, random is better,
            ``benchmarks/README.md``).
        background: colour transparent pixels are flattened onto.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        num_workers: image-decoding worker processes.
        seed: random seed (runs are deterministic on CPU for a given seed).

    Fitted attributes:
        labels_ (``N``), confidences_ (``N``, each sample's transport mass on its cluster),
        cluster_sizes_ (``K``), filenames_ (``N`` names; ``"0".."N-1"`` for matrices),
        skipped_ (``(name, reason)`` of unreadable files), history_ (per-epoch loss and rho),
        best_epoch_, n_features_in_, fit_seconds_, features_ (``N x d`` float32: the features the
        labels were predicted from, e.g. for a 2-D map of the images).
    """

    def __init__(self, n_clusters: int = 10, *, backbone: str = "efficientnet_lite0", checkpoint: str | None = None,
                 mode: str = "fast", epochs: int | None = None, formulation: str = "sp2ot", batch_size: int = 512,
                 bank_batches: int = 10, lr: float = 5e-4, lr_min: float = 5e-6, rho0: float = 0.1,
                 rho_schedule: str = "sigmoid", eps: float = 0.1, lam: float = 1.0, lam_s: float = 1000.0,
                 knn: int = 20, sigma: float = 2.0, kernel: str = "gaussian", input_size: int | None = None,
                 init: str = "auto", background: str = "white", device: str = "auto", num_workers: int = 0,
                 seed: int = 0) -> None:
        self.n_clusters = n_clusters
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
        self.background = background
        self.device = device
        self.num_workers = num_workers
        self.seed = seed

    # ------------------------------------------------------------------------------ checks

    def _validate_params(self) -> None:
        if not isinstance(self.n_clusters, (int, np.integer)) or isinstance(self.n_clusters, bool) or self.n_clusters < 2:
            raise ValueError(f"n_clusters must be an integer >= 2, got {self.n_clusters!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.formulation not in ALL_FORMULATIONS:
            raise ValueError(f"formulation must be one of {', '.join(ALL_FORMULATIONS)}, got {self.formulation!r}")
        if self.epochs is not None and (not isinstance(self.epochs, (int, np.integer)) or self.epochs < 1):
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.bank_batches < 1:
            raise ValueError(f"bank_batches must be >= 1, got {self.bank_batches}")
        if not 0 < self.rho0 <= 1:
            raise ValueError(f"rho0 must be in (0, 1], got {self.rho0}")
        rho_schedule(0, 1, self.rho0, self.rho_schedule)  # validates the kind
        if self.init not in ("auto", "kmeans", "random"):
            raise ValueError(f"init must be 'auto', 'kmeans' or 'random', got {self.init!r}")
        if self.kernel not in ("gaussian", "cosine"):
            raise ValueError(f"kernel must be 'gaussian' or 'cosine', got {self.kernel!r}")

    def _config(self, n: int) -> TrainConfig:
        epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.mode]
        return TrainConfig(n_clusters=int(self.n_clusters), epochs=int(epochs), batch_size=min(self.batch_size, n),
                           bank_batches=self.bank_batches, lr=self.lr, lr_min=self.lr_min, rho0=self.rho0,
                           rho_kind=self.rho_schedule, eps=self.eps, lam=self.lam, lam_s0=self.lam_s,
                           formulation=self.formulation, seed=self.seed)

    # ------------------------------------------------------------------------------ fit

    def fit(self, X, y=None, *, progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] | None = None) -> "SP2OTClustering":
        """Cluster ``X``: a folder or archive of images (path), or an ``N x d`` feature matrix.

        ``progress(info)`` receives ``{stage, percent, epoch, step, total_steps, loss, rho}``;
        ``should_stop()`` is polled between steps and raises :class:`Cancelled` when True.
        Raises ``ValueError`` for bad input (no readable image, ``K`` larger than ``N``, ...).
        """
        self._validate_params()
        t_start = time.perf_counter()
        report = _Reporter(progress)
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        from sp2ot_engine.backbones import resolve_device

        device = resolve_device(self.device)
        self.device_ = str(device)

        backbone = collection = None
        if _is_path(X):
            collection = self._scan(X, report)
            backbone = self._make_backbone(device)
            features = self._extract(backbone, collection, device, report, should_stop)
            self.filenames_ = list(collection.names)
            self.skipped_ = list(collection.skipped)
        else:
            features = self._as_features(X)
            self.filenames_ = [str(i) for i in range(features.shape[0])]
            self.skipped_ = []
        n = features.shape[0]
        if self.n_clusters > n:
            raise ValueError(f"n_clusters={self.n_clusters} is larger than the number of samples ({n}): "
                             f"ask for at most {n} clusters")
        self.n_features_in_ = int(features.shape[1])
        cfg = self._config(n)

        graph = None
        if self.formulation == "sp2ot":
            report({"stage": "graph", "percent": 0.0})
            from sp2ot_engine.graph import knn_graph

            graph = knn_graph(features, k=min(self.knn, n - 1), kernel=self.kernel, sigma=self.sigma,
                              device=device if device.type == "cuda" else "cpu")
        head = CosineHead(features.shape[1], cfg.n_clusters)
        if self.init == "kmeans" or (self.init == "auto" and cfg.epochs * (n // cfg.batch_size) < AUTO_INIT_STEPS):
            report({"stage": "graph", "percent": 50.0})
            head.weight.data.copy_(spherical_kmeans(features, cfg.n_clusters, self.seed))
        head = head.to(device)
        if self.mode == "fast" or backbone is None:
            batches, steps = feature_batches(features, cfg.batch_size, self.seed)
            encoder = None
        else:
            batches, steps, encoder = self._image_batches(collection, backbone, cfg, device)
        result = train_head(cfg, encoder, head, batches, steps, graph, device,
                            progress=report, should_stop=should_stop)
        head.load_state_dict(result.head_state)
        if encoder is not None and result.encoder_state is not None:
            encoder.load_state_dict(result.encoder_state)
            features = self._extract(encoder, collection, device, report, should_stop, stage="predicting")
        report({"stage": "predicting", "percent": 0.0})
        logits = predict_logits(head, features, device)
        self.labels_ = logits.argmax(dim=1).numpy().astype(np.int64)
        self.confidences_ = assignment_confidence(logits, self.labels_, cfg)
        self.cluster_sizes_ = np.bincount(self.labels_, minlength=cfg.n_clusters)
        self.features_ = features.detach().cpu().numpy()  # a view of the tensor: no copy
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.head_state_ = {k: v.detach().cpu() for k, v in head.state_dict().items()}
        self.encoder_state_ = None
        if encoder is not None:
            self.encoder_state_ = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        self.fit_seconds_ = time.perf_counter() - t_start
        report({"stage": "done", "percent": 100.0})
        if collection is not None:
            collection.close()
        return self

    def fit_predict(self, X, y=None, **kwargs) -> np.ndarray:
        """Fit and return ``labels_``."""
        return self.fit(X, y, **kwargs).labels_

    def predict(self, X) -> np.ndarray:
        """Assign new images (path) or feature rows to the fitted clusters (argmax of the head)."""
        return self._predict_logits(X).argmax(dim=1).numpy().astype(np.int64)

    def _predict_logits(self, X) -> torch.Tensor:
        if not hasattr(self, "head_state_"):
            raise ValueError("this SP2OTClustering is not fitted yet: call fit first")
        from sp2ot_engine.backbones import resolve_device

        device = resolve_device(self.device)
        if _is_path(X):
            if self.n_features_in_ is None or getattr(self, "fitted_on_", "images") != "images":
                raise ValueError("this model was fitted on a feature matrix: pass features, not images")
            collection = self._scan(X, _Reporter(None))
            backbone = self._make_backbone(device)
            if self.encoder_state_ is not None:
                backbone.load_state_dict(self.encoder_state_)
            features = self._extract(backbone, collection, device, _Reporter(None), None)
            self.predict_filenames_ = list(collection.names)
            collection.close()
        else:
            features = self._as_features(X)
            if features.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {features.shape[1]} features; the model was fitted on {self.n_features_in_}")
        head = CosineHead(self.n_features_in_, int(self.n_clusters))
        head.load_state_dict(self.head_state_)
        return predict_logits(head.to(device), features, device)

    # ------------------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Save parameters and fitted state (``torch.save``; reload with :meth:`load`)."""
        if not hasattr(self, "head_state_"):
            raise ValueError("nothing to save: the model is not fitted")
        state = {"params": self.get_params(), "head_state": self.head_state_, "encoder_state": self.encoder_state_,
                 "n_features_in": self.n_features_in_, "cluster_sizes": self.cluster_sizes_.tolist(),
                 "fitted_on": getattr(self, "fitted_on_", "images"), "version": 1}
        torch.save(state, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SP2OTClustering":
        """Load a model saved with :meth:`save`; it can ``predict`` new images or features."""
        if not Path(path).is_file():
            raise ValueError(f"model file not found: {path}")
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        est = cls(**state["params"])
        est.head_state_ = state["head_state"]
        est.encoder_state_ = state["encoder_state"]
        est.n_features_in_ = state["n_features_in"]
        est.cluster_sizes_ = np.asarray(state["cluster_sizes"])
        est.fitted_on_ = state["fitted_on"]
        return est

    # ------------------------------------------------------------------------------ helpers

    def _as_features(self, X) -> torch.Tensor:
        if isinstance(X, torch.Tensor):
            x = X.detach().cpu().float()
        else:
            try:
                x = torch.as_tensor(np.asarray(X, dtype=np.float32))
            except (TypeError, ValueError) as e:
                raise ValueError(f"X must be a path to images or an N x d numeric matrix: {e}") from None
        if x.ndim != 2:
            raise ValueError(f"X must be an N x d feature matrix (2-D), got shape {tuple(x.shape)}")
        if x.shape[0] < 2 or x.shape[1] < 1:
            raise ValueError(f"X has shape {tuple(x.shape)}: need at least 2 samples and 1 feature")
        if not all_finite(x.numpy()):
            raise ValueError("X contains NaN or infinite values")
        self.fitted_on_ = "features"
        return x.contiguous()

    def _scan(self, path, report: "_Reporter"):
        from sp2ot_engine.io.collection import scan_images

        report({"stage": "loading", "percent": 0.0})
        collection = scan_images(path, background=self.background,
                                 progress=lambda done, total: report({"stage": "loading",
                                                                      "percent": 100.0 * done / max(total, 1)}))
        if len(collection) == 0:
            reasons = "; ".join(f"{n}: {r}" for n, r in collection.skipped[:5])
            raise ValueError(f"no readable image in {path}" + (f" (skipped: {reasons})" if reasons else ""))
        self.fitted_on_ = "images"
        return collection

    def _make_backbone(self, device: torch.device):
        from sp2ot_engine.backbones import create_backbone

        bb = create_backbone(self.backbone, checkpoint=self.checkpoint, device=device, input_size=self.input_size)
        if self.mode == "fast":
            bb.freeze_all()
        return bb

    def _extract(self, backbone, collection, device, report: "_Reporter", should_stop, stage: str = "features"):
        from sp2ot_engine.backbones import extract_features
        from sp2ot_engine.io.loader import ImageDataset
        from sp2ot_engine.transforms import eval_transform

        dataset = ImageDataset(collection, eval_transform(backbone.input_size, backbone.mean, backbone.std))

        def on_batch(done: int, total: int) -> None:
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled during feature extraction")
            report({"stage": stage, "percent": 100.0 * done / max(total, 1)})

        batch = 64 if device.type == "cpu" else 256
        return extract_features(backbone, dataset, batch_size=batch, num_workers=self.num_workers, device=device,
                                progress=on_batch)

    def _image_batches(self, collection, backbone, cfg: TrainConfig, device):
        from sp2ot_engine.io.loader import ImageDataset, make_loader
        from sp2ot_engine.transforms import TwoViews, train_transform

        aug = train_transform(backbone.input_size, backbone.mean, backbone.std)
        dataset = _TwoViewDataset(ImageDataset(collection, TwoViews(aug)))
        loader = make_loader(dataset, cfg.batch_size, shuffle=True, num_workers=self.num_workers, seed=self.seed,
                             drop_last=len(dataset) > cfg.batch_size, device=device)
        backbone.unfreeze_last_block()

        def batches(epoch: int):
            for (view_a, view_b), index in loader:
                yield index, view_a, view_b

        return batches, len(loader), backbone


class _TwoViewDataset(torch.utils.data.Dataset):
    """``((view_a, view_b), index)`` items, as the training loop consumes them."""

    returns_index = True

    def __init__(self, inner) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


class _Reporter:
    """Fills in the progress dictionary's keys so every consumer sees the same shape."""

    keys = ("stage", "percent", "epoch", "step", "total_steps", "loss", "rho")

    def __init__(self, fn: ProgressFn | None) -> None:
        self.fn = fn

    def __call__(self, info: dict) -> None:
        if self.fn is not None:
            self.fn({k: info.get(k) for k in self.keys} | info)
