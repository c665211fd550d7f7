"""Cost of the perceptual hashes (near-duplicate flag) in feature extraction: the estimator's
``_extract`` on N Fashion-MNIST 28 x 28 PNGs with and without hashes, alternated, in one process.

    python benchmarks/hash_cost.py            # N = 2,000, two rounds
"""
import os, sys, time, tempfile
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, torch
torch.set_num_threads(2)
from PIL import Image
from pathlib import Path
from datasets import fashion_mnist_lt
from sp2ot_engine import SP2OTClustering
from sp2ot_engine.io.collection import ImageCollection
train, test = fashion_mnist_lt()
with tempfile.TemporaryDirectory() as tmp:
    for i, img in enumerate(test.images[:2000]):
        Image.fromarray(img).save(Path(tmp) / f"{i:06d}.png")
    est = SP2OTClustering(10, device="cpu")
    from sp2ot_engine.backbones import resolve_device
    dev = resolve_device("cpu")
    bb = est._make_backbone(dev)
    from sp2ot_engine.clustering import _Reporter
    for rep in range(2):
        for wh in (False, True):
            coll, _ = est._scan(tmp, _Reporter(None))
            t = time.perf_counter(); est._extract(bb, coll, dev, _Reporter(None), None, with_hashes=wh); print("hashes", wh, round(time.perf_counter()-t,1), flush=True)
