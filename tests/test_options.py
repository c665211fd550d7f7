"""sp2ot_engine.options is the one vocabulary: the engine's own lists agree with it."""
from __future__ import annotations

import pytest

from sp2ot_engine import options


def test_enums_are_their_strings():
    assert options.Mode("fast") is options.Mode.FAST and options.Mode.FAST == "fast" and str(options.Mode.FULL) == "full"
    assert options.MODES == ("fast", "full")
    assert options.FORMULATIONS == ("sp2ot", "p2ot", "pot", "uot", "ot")
    assert options.TRANSPORT_FORMULATIONS == ("p2ot", "pot", "uot", "ot")
    assert options.INITS == ("auto", "density", "spectral", "kmeans", "random")
    assert options.KERNELS == ("gaussian", "cosine")
    assert options.RHO_SCHEDULES == ("sigmoid", "linear", "fixed")
    assert options.BACKBONES == ("efficientnet_lite0", "dino_vitb16", "dino_vits16")
    assert options.PROGRESS_FIELDS == ("stage", "percent", "epoch", "step", "total_steps", "loss", "rho")
    assert tuple(options.PROGRESS_TYPES) == options.PROGRESS_FIELDS  # a type for every field
    assert options.STAGES == ("loading", "features", "graph", "starts", "training", "predicting", "done")
    with pytest.raises(ValueError):
        options.Formulation("sinkhorn")


def test_the_engine_uses_the_vocabulary():
    from sp2ot_engine import cli, clustering, graph, ot

    assert ot.FORMULATIONS == options.TRANSPORT_FORMULATIONS
    # the estimator's parameter constraints take their choices from the vocabulary
    constraints = clustering.SP2OTClustering._parameter_constraints
    for param, values in {"mode": options.MODES, "formulation": options.FORMULATIONS, "init": options.INITS,
                          "kernel": options.KERNELS, "rho_schedule": options.RHO_SCHEDULES}.items():
        assert constraints[param][0].options == set(values), param
    assert not hasattr(clustering, "ALL_FORMULATIONS")  # its own copy is gone
    seen = []
    clustering._Reporter(seen.append)({"stage": "graph", "percent": 1.0})
    assert tuple(seen[0]) == options.PROGRESS_FIELDS
    for kind in options.RHO_SCHEDULES:
        assert 0 < ot.rho_schedule(1, 2, 0.1, kind) <= 1
    parser = cli.build_parser()
    cluster = parser._subparsers._group_actions[0].choices["cluster"]
    choices = {a.dest: tuple(a.choices) for a in cluster._actions if a.choices}
    assert choices == {"mode": options.MODES, "formulation": options.FORMULATIONS, "init": options.INITS}
    with pytest.raises(ValueError, match="'gaussian', 'cosine'"):
        graph.knn_graph([[0.0], [1.0], [2.0]], k=1, kernel="laplace")
