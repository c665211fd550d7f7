"""SP2OT: semantic-regularised progressive partial optimal transport for imbalanced clustering.

The engine is usable alone (library and ``sp2ot-engine`` CLI); it never imports the web
service (``app``) or the worker.
"""
from sp2ot_engine.errors import Cancelled

__all__ = ["Cancelled", "SP2OTClustering"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The estimator pulls in torch/timm; import it lazily so `import sp2ot_engine` stays cheap.
    if name == "SP2OTClustering":
        from sp2ot_engine.clustering import SP2OTClustering

        return SP2OTClustering
    raise AttributeError(name)
