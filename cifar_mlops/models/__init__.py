"""The model registry: one decorator maps a model name to its factory.

A factory takes plain keyword arguments (`num_classes`, `image_size`,
`interpolation`, `width`, `weights`, `blocks`, `dropout`: the ones it uses)
and returns an *uncompiled* `keras.Model` whose input is raw uint8 images of
shape (32, 32, 3); resizing and normalization live inside the model, so every
registered model (and an ensemble of them) is fed the same raw images.
`create_model(name, **settings)` builds one by name, refusing a setting the
model does not use.

This package knows nothing of experiment files: `config` validates model names
through it, never the other way round. Factory modules import keras inside
their functions, not at module level, so that listing the registry (and the
`experiments` command) stays free of the 5-second TensorFlow import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cifar_mlops.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import keras

Factory = Callable[..., "keras.Model"]


class UnknownModel(UserError):
    """No model is registered under that name; the message lists the known ones."""


class ModelSettingError(UserError):
    """A model setting this model cannot take (unused by it, or a shape pretrained weights do not fit)."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    family: str  # registered-model family: the MLflow model is `cifar10-<family>`
    factory: Factory
    description: str
    settings: dict[str, Any]  # the keyword arguments it takes besides num_classes -> their defaults


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, *, family: str, settings_of: Factory | None = None) -> Callable[[Factory], Factory]:
    """Register `factory` under `name`; the first line of its docstring describes it.

    Its settings are its keyword arguments; a variant written as `def v(**settings)` names
    the builder it passes them to in `settings_of`.
    """

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        parameters = inspect.signature(settings_of or factory).parameters.values()
        settings = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "num_classes"}
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = RegisteredModel(name, family, factory, doc[0] if doc else "", settings)
        return factory

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> RegisteredModel:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, *, num_classes: int = 10, **settings: Any) -> keras.Model:
    """Build the uncompiled model registered as `name` with `settings` (each one it takes, or none)."""
    entry = get_model_entry(name)
    unused = [key for key in settings if key not in entry.settings]
    if unused:
        raise ModelSettingError(f"model.{unused[0]}={settings[unused[0]]!r} is not used by {name} "
                                f"(it takes {', '.join(entry.settings)}); remove it")
    return entry.factory(num_classes=num_classes, **settings)


def init_from_data(model: keras.Model, images, seed: int = 0) -> list[str]:
    """Set the layers a model computes from its training images instead of learning them (a CNN's fixed
    patch-whitening layer), once, before training; the names of the layers set."""
    return [cnn.WHITENING_LAYER] if cnn.init_whitening(model, images, seed=seed) else []


# Importing the factory modules fills the registry (last: they import register_model from here).
from cifar_mlops.models import applications, cnn, stacked  # noqa: E402,F401
from cifar_mlops.models.applications import WeightsUnavailable  # noqa: E402,F401  (re-exported for callers)
