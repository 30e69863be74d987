"""The model registry: one decorator maps a model name to its factory.

A factory takes the validated `ModelConfig` and the number of classes and
returns an *uncompiled* `keras.Model` whose input is raw uint8 images of shape
(32, 32, 3); resizing and normalization live inside the model, so every
registered model (and an ensemble of them) is fed the same raw images.

Factory modules import keras inside their functions, not at module level, so
that listing the registry (and the `experiments` command) stays free of the
5-second TensorFlow import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from cifar_mlops.config import ModelConfig

Factory = Callable[["ModelConfig", int], "keras.Model"]


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    family: str  # registered-model family: the MLflow model is `cifar10-<family>`
    factory: Factory
    description: str


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, *, family: str) -> Callable[[Factory], Factory]:
    """Register `factory` under `name`; the first line of its docstring describes it."""

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = RegisteredModel(name, family, factory, doc[0] if doc else "")
        return factory

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> RegisteredModel:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(config: "ModelConfig", num_classes: int = 10) -> "keras.Model":
    """Build the uncompiled model named by `config.name`."""
    return get_model_entry(config.name).factory(config, num_classes)


# Importing the factory modules fills the registry.
from cifar_mlops.models import applications, cnn  # noqa: E402,F401
from cifar_mlops.models.applications import WeightsUnavailable  # noqa: E402,F401  (re-exported for callers)
