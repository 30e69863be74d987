"""The model registry: one decorator maps a model name to its factory (as timm's `_registry`).

A factory takes plain keyword arguments (`num_classes`, `image_size`,
`interpolation`, `width`, `weights`, `blocks`, `dropout`: the ones it uses)
and returns an *uncompiled* `keras.Model` whose input is raw uint8 images of
shape (32, 32, 3); resizing and normalization live inside the model, so every
registered model (and an ensemble of them) is fed the same raw images.
`create_model(name, **settings)` builds one by name, refusing a setting the
model does not use.

This module knows no factory: the factory modules register theirs when
`cifar_mlops.models` imports them.
"""

from __future__ import annotations

import fnmatch
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


def list_models(pattern: str | None = None) -> list[str]:
    """The registered names, sorted; only those matching the shell-style `pattern` (e.g. "cnn_b*") when given."""
    return sorted(name for name in _REGISTRY if pattern is None or fnmatch.fnmatchcase(name, pattern))


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
