"""Images into torch: a Dataset over an :class:`~sp2ot_engine.io.collection.ImageCollection`,
seeded DataLoaders, and single-threaded per-sample work (torch)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from sp2ot_engine.io.collection import ImageCollection

__all__ = ["ImageDataset", "collate_single_threaded", "make_loader", "single_threaded"]


class ImageDataset(Dataset):
    """``dataset[i] -> (transform(collection.load(i)), i)``.

    ``min_side`` (default: the transform's ``decode_min_side`` attribute, set by
    :func:`eval_transform` / :func:`train_transform`) lets big JPEGs decode at a reduced scale.
    With ``transform=None`` the PIL image itself is returned. With ``image_hash`` (a function of
    the decoded PIL image to an int64, e.g. a perceptual hash viewed as int64) items are
    ``(x, i, image_hash(image))``: the hash of the very image that was transformed.
    """

    returns_index = True  # the second item of each sample is its dataset index

    def __init__(self, collection: ImageCollection, transform: Callable | None = None, *,
                 min_side: int | None = None, image_hash: Callable | None = None):
        self.collection = collection
        self.transform = transform
        self.image_hash = image_hash
        self.min_side = min_side if min_side is not None else getattr(transform, "decode_min_side", None)

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, i: int):
        # Per-image tensor ops are tiny: OpenMP parallel regions on them cost far more than the
        # work (7-27 ms instead of ~1 ms per 224-px image on the shared 2-core machine).
        # DataLoader workers already run single-threaded; do the same in the main process.
        with single_threaded():
            img = self.collection.load(i, min_side=self.min_side)
            x = self.transform(img) if self.transform is not None else img
            return (x, i) if self.image_hash is None else (x, i, self.image_hash(img))


class single_threaded:
    """Context manager: torch intra-op threads = 1 inside (restored on exit); a no-op when already 1.

    Per-sample and per-batch data work (transforms, collation) is small and memory-bound; in a
    process whose torch thread pool is sized for the model, each tiny op pays for an OpenMP
    parallel region, which on a busy machine costs several times the work itself.
    """

    def __enter__(self):
        self.threads = torch.get_num_threads()
        if self.threads > 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.threads > 1:
            torch.set_num_threads(self.threads)


def collate_single_threaded(batch):
    """``default_collate`` with torch intra-op threads = 1 (see :class:`single_threaded`)."""
    with single_threaded():
        return default_collate(batch)


def _seed_worker(worker_id: int) -> None:
    # torch seeds torch and `random` per worker from the loader's generator; numpy too, here.
    np.random.seed(torch.initial_seed() % 2**32)
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False, *, device: str | torch.device | None = None,
                persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                multiprocessing_context=None) -> DataLoader:
    """A DataLoader: seeded generator (reproducible shuffling and augmentation), worker processes
    (persistent by default when ``num_workers > 0``), ``pin_memory`` only for a CUDA ``device``
    (default: pinned iff CUDA is available and no CPU device was asked for). Batches are collated
    single-threaded (:func:`collate_single_threaded`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    if device is None:
        pin = torch.cuda.is_available()
    else:
        pin = torch.device(device).type == "cuda"
    kwargs = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        kwargs["worker_init_fn"] = _seed_worker
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = multiprocessing_context
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=g, drop_last=drop_last, pin_memory=pin,
                      collate_fn=collate_single_threaded, **kwargs)
