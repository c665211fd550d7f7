"""The backbone registry: a name -> factory table filled by the :func:`register_backbone` decorator.

A factory builds the timm model of one named backbone with its weights and says how to feed it:
it is called with keyword arguments ``checkpoint`` (a local weight file or None), ``pretrained``
and ``input_size`` (None for the backbone's own) and returns a :class:`BuiltModel`. Only names
of :class:`sp2ot_engine.options.Backbone` can be registered, so the torch-free vocabulary and
the registry list the same backbones.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from sp2ot_engine.options import BACKBONES

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

__all__ = ["BackboneFactory", "BuiltModel", "backbone_factory", "list_backbones", "register_backbone"]


class BuiltModel(NamedTuple):
    """What a factory returns: the model (``num_classes=0``, pooled features), its timm
    architecture name, the normalisation its weights expect and its input resolution."""

    model: "nn.Module"
    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int


BackboneFactory = Callable[..., BuiltModel]
_FACTORIES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make the decorated function the factory of backbone ``name``."""

    def register(factory: BackboneFactory) -> BackboneFactory:
        if name not in BACKBONES:
            raise ValueError(f"backbone {name!r} is not in sp2ot_engine.options.Backbone: add it there first")
        if name in _FACTORIES:
            raise ValueError(f"backbone {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return register


def list_backbones() -> list[str]:
    """Names of the registered backbones, in the order of :class:`sp2ot_engine.options.Backbone`."""
    return [name for name in BACKBONES if name in _FACTORIES]


def backbone_factory(name: str) -> BackboneFactory | None:
    """The factory registered under ``name``, or None."""
    return _FACTORIES.get(name)
