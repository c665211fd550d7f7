"""Job options: server defaults and validation before a job is queued."""
from __future__ import annotations

from typing import Any

from app.core.config import Settings
from app.errors import UploadRejected
from app.schemas import JobParams


def resolve_options(params: JobParams, settings: Settings) -> dict[str, Any]:
    """The options stored on the job row (defaults filled in), or a 422 naming the bad one."""
    opts = {
        "n_clusters": params.n_clusters,
        "backbone": params.backbone or settings.default_backbone,
        "mode": params.mode or settings.default_mode,
        "epochs": params.epochs,
        "formulation": params.formulation or settings.default_formulation,
        "seed": params.seed,
    }
    if opts["n_clusters"] > settings.max_clusters:
        raise UploadRejected(f"n_clusters={opts['n_clusters']} is above the server limit of {settings.max_clusters}.")
    if opts["epochs"] is not None and opts["epochs"] > settings.max_epochs:
        raise UploadRejected(
            f"epochs={opts['epochs']} is above the server limit of {settings.max_epochs} (SP2OT_MAX_EPOCHS)."
        )
    known = _engine_choices()
    for field, choices in known.items():
        if choices and opts[field] not in choices:
            raise UploadRejected(
                f"{field}={opts[field]!r} is not available. Use one of: {', '.join(map(str, choices))}."
            )
    return opts


def _engine_choices() -> dict[str, tuple]:
    """The values the engine accepts, when it publishes them."""
    out: dict[str, tuple] = {}
    try:
        from sp2ot_engine.backbones import SUPPORTED_BACKBONES

        out["backbone"] = tuple(SUPPORTED_BACKBONES)
    except Exception:  # pragma: no cover - engine without the list: it validates itself
        pass
    try:
        from sp2ot_engine.clustering import ALL_FORMULATIONS, MODES

        out["mode"] = tuple(MODES)
        out["formulation"] = tuple(ALL_FORMULATIONS)
    except Exception:  # pragma: no cover
        pass
    return out
