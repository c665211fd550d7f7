"""Shared helpers of the benchmarks: long-tailed data sets and cached backbone features."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CACHE = Path(__file__).resolve().parent / ".cache"


class ArrayImages(torch.utils.data.Dataset):
    """uint8 image arrays through the engine's own RGB conversion and eval transform."""

    returns_index = True

    def __init__(self, images: np.ndarray, transform, background: str = "white") -> None:
        self.images, self.transform, self.background = images, transform, background

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from sp2ot_engine.io.decode import to_rgb

        arr = self.images[i]
        img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] != 1 else arr[..., 0])
        return self.transform(to_rgb(img, self.background)), i


def cached_features(name: str, images: np.ndarray, backbone: str = "efficientnet_lite0", input_size: int | None = None,
                    background: str = "white", batch_size: int = 64, num_workers: int = 2) -> np.ndarray:
    """Backbone features of ``images`` (N x d float32), computed once and cached on disk."""
    from sp2ot_engine.backbones import create_backbone, extract_features
    from sp2ot_engine.transforms import eval_transform

    digest = hashlib.sha1(images.tobytes()).hexdigest()[:10]
    path = CACHE / f"{name}-{backbone}-{input_size}-{background}-{digest}.npy"
    if path.exists():
        return np.load(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    bb = create_backbone(backbone, input_size=input_size)
    bb.freeze_all()
    ds = ArrayImages(images, eval_transform(bb.input_size, bb.mean, bb.std), background)
    t = time.perf_counter()
    feats = extract_features(bb, ds, batch_size=batch_size, num_workers=num_workers).numpy()
    print(f"[features] {name}: {len(images)} images at {bb.input_size}px in {time.perf_counter() - t:.1f}s", flush=True)
    np.save(path, feats)
    return feats
