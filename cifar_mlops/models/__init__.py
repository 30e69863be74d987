"""Model factories by name: the registry (`registry`) and the modules whose factories fill it.

Importing this package imports the factory modules (`cnn`, `stacked`, `applications`), each of
which registers its factories with `registry.register_model`; callers use `create_model`,
`list_models` and `get_model_entry` from here.

This package knows nothing of experiment files: `config` validates model names
through it, never the other way round. Factory modules import keras inside
their functions, not at module level, so that listing the registry (and the
`experiments` command) stays free of the 5-second TensorFlow import.
"""

from cifar_mlops.models import applications, cnn, stacked  # noqa: F401  (registering their factories)
from cifar_mlops.models.applications import WeightsUnavailable
from cifar_mlops.models.cnn import init_from_data
from cifar_mlops.models.registry import (
    Factory,
    ModelSettingError,
    RegisteredModel,
    UnknownModel,
    create_model,
    get_model_entry,
    list_models,
    register_model,
)

__all__ = ["Factory", "ModelSettingError", "RegisteredModel", "UnknownModel", "WeightsUnavailable", "create_model",
           "get_model_entry", "init_from_data", "list_models", "register_model"]
