"""The engine's vocabulary: every named choice a caller can make, in one torch-free module.

Each choice is a ``StrEnum`` (its members compare equal to their string values, so ``"fast"``
and ``Mode.FAST`` are interchangeable and JSON holds plain strings) plus a tuple of the values
in display order, for ``argparse`` choices and error messages. A pydantic schema can take the
enums as field types, so OpenAPI lists the allowed values.

Importing this module imports nothing but the standard library (the API process must not load
torch); the backbone registry (:mod:`sp2ot_engine.backbones`) refuses to register a name that
is not in :class:`Backbone`, so the two cannot drift apart.
"""
from __future__ import annotations

import enum
import sys

__all__ = [
    "BACKBONES",
    "FORMULATIONS",
    "INITS",
    "K_CRITERIA",
    "KERNELS",
    "MODES",
    "PROGRESS_FIELDS",
    "PROGRESS_TYPES",
    "RHO_SCHEDULES",
    "STAGES",
    "TRANSPORT_FORMULATIONS",
    "Backbone",
    "Formulation",
    "Init",
    "KCriterion",
    "Kernel",
    "Mode",
    "ProgressField",
    "RhoSchedule",
    "Stage",
    "StrEnum",
]

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10: the same behaviour, spelled out
    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


class Mode(StrEnum):
    """How the estimator trains: ``fast`` (frozen backbone, cached features, only the head
    trains) or ``full`` (the paper's: the backbone's last block is fine-tuned on augmented views)."""

    FAST = "fast"
    FULL = "full"


class Formulation(StrEnum):
    """The pseudo-label transport problem (paper Table IV): ``sp2ot`` is ``p2ot`` plus the
    semantic (kNN graph) term; ``pot``, ``uot`` and ``ot`` are the ablations."""

    SP2OT = "sp2ot"
    P2OT = "p2ot"
    POT = "pot"
    UOT = "uot"
    OT = "ot"


class Init(StrEnum):
    """Where the cluster head's prototypes start (:mod:`sp2ot_engine.starts`): ``density``
    (ToMATo modes of the kNN graph), ``spectral`` (spectral clustering of the graph), ``auto``
    (both, each refined by training; the one with the higher silhouette is kept), ``kmeans``
    (spherical k-means) or ``random`` (the paper's)."""

    AUTO = "auto"
    DENSITY = "density"
    SPECTRAL = "spectral"
    KMEANS = "kmeans"
    RANDOM = "random"


class KCriterion(StrEnum):
    """What :func:`sp2ot_engine.auto_k.choose_k` maximises over ``K`` when the number of clusters
    is left open: ``modularity`` (Newman's modularity of the spectral partition of the kNN graph;
    the default), ``silhouette-macro`` (the mean over the spectral clusters of their mean cosine
    silhouette), ``silhouette`` (the mean over points) or ``eigengap`` (of the normalised
    Laplacian of the kNN graph)."""

    MODULARITY = "modularity"
    SILHOUETTE_MACRO = "silhouette-macro"
    SILHOUETTE = "silhouette"
    EIGENGAP = "eigengap"


class Kernel(StrEnum):
    """Similarity of the kNN graph's edges (:func:`sp2ot_engine.graph.knn_graph`)."""

    GAUSSIAN = "gaussian"
    COSINE = "cosine"


class RhoSchedule(StrEnum):
    """Shape of the transported-mass curriculum ``rho(t)`` (:func:`sp2ot_engine.ot.rho_schedule`)."""

    SIGMOID = "sigmoid"
    LINEAR = "linear"
    FIXED = "fixed"


class Backbone(StrEnum):
    """Feature backbones with built-in weights (any other timm name needs a checkpoint)."""

    EFFICIENTNET_LITE0 = "efficientnet_lite0"
    DINO_VITB16 = "dino_vitb16"
    DINO_VITS16 = "dino_vits16"


class ProgressField(StrEnum):
    """Keys of the progress dictionary a fit reports; every report carries all of them
    (``None`` when a stage has no value for one)."""

    STAGE = "stage"
    PERCENT = "percent"
    EPOCH = "epoch"
    STEP = "step"
    TOTAL_STEPS = "total_steps"
    LOSS = "loss"
    RHO = "rho"


class Stage(StrEnum):
    """Values of the progress dictionary's ``stage``, in the order a fit goes through them."""

    LOADING = "loading"
    FEATURES = "features"
    GRAPH = "graph"
    STARTS = "starts"
    TRAINING = "training"
    PREDICTING = "predicting"
    DONE = "done"


MODES: tuple[str, ...] = tuple(m.value for m in Mode)
FORMULATIONS: tuple[str, ...] = tuple(f.value for f in Formulation)
#: The formulations :func:`sp2ot_engine.ot.solve_transport` solves directly (all but ``sp2ot``).
TRANSPORT_FORMULATIONS: tuple[str, ...] = tuple(f.value for f in Formulation if f is not Formulation.SP2OT)
INITS: tuple[str, ...] = tuple(i.value for i in Init)
KERNELS: tuple[str, ...] = tuple(k.value for k in Kernel)
K_CRITERIA: tuple[str, ...] = tuple(c.value for c in KCriterion)
RHO_SCHEDULES: tuple[str, ...] = tuple(r.value for r in RhoSchedule)
BACKBONES: tuple[str, ...] = tuple(b.value for b in Backbone)
PROGRESS_FIELDS: tuple[str, ...] = tuple(p.value for p in ProgressField)
STAGES: tuple[str, ...] = tuple(s.value for s in Stage)
#: The type of each progress field's value (a report may carry ``None`` for any of them).
PROGRESS_TYPES: dict[str, type] = {
    ProgressField.STAGE: str, ProgressField.PERCENT: float, ProgressField.EPOCH: int, ProgressField.STEP: int,
    ProgressField.TOTAL_STEPS: int, ProgressField.LOSS: float, ProgressField.RHO: float,
}
