"""The :class:`Backbone` wrapper (a timm model returning pooled features, which of its
parameters train) and model construction, on the ``meta`` device when weights follow."""
from __future__ import annotations

import torch
from torch import nn


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


def tail_module_names(model: nn.Module) -> list[str]:
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


def create_timm_model(arch: str, *, weights_follow: bool, **kwargs) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)``. When every weight is about to be overwritten by
    a checkpoint, the model is built on the ``meta`` device (no random init of e.g. ViT-B's 86M
    parameters); the loaders then assign real tensors (and fill anything left, see
    :func:`check_materialised`)."""
    import timm

    if weights_follow:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        model._sp2ot_recipe = (arch, kwargs)
        return model
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
