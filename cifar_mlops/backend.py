"""Which Keras backend trains (TensorFlow, JAX or PyTorch), what it needs, and the GPUs it sees.

The backend is Keras's own choice: $KERAS_BACKEND (which `cifar-mlops --backend` sets before
Keras is imported, so that tuning and ablation workers inherit it), else Keras's config file,
else TensorFlow. Only the standard library is imported here; the backend's own module
is imported inside the functions that ask it something.
"""

from __future__ import annotations

import os
import sys

from cifar_mlops.errors import UserError

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT = "tensorflow"
# The install extra that brings each backend, and the distributions a served model pins for it.
EXTRAS = {"tensorflow": "cpu", "jax": "jax", "torch": "torch"}
PACKAGES = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "jax": ("jax", "jaxlib"), "torch": ("torch",)}
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "jaxlib": "jax", "torch": "torch"}


class BackendError(UserError):
    """The Keras backend asked for cannot be used (unknown, not installed, or another one already loaded)."""


def select(name: str) -> None:
    """Make `name` the backend of this process and of every process it starts."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != name:
        raise BackendError(f"Keras already runs on {current()} in this process; "
                           f"start a new one with KERAS_BACKEND={name}")
    os.environ["KERAS_BACKEND"] = name


def current() -> str:
    """The backend Keras runs on (imports Keras)."""
    import keras

    return keras.backend.backend()


def missing(module: str) -> BackendError | None:
    """The one-line error for a backend library that is not installed (None: not a backend library)."""
    backend = MODULES.get(module.partition(".")[0])
    if backend is None:
        return None
    wanted = os.environ.get("KERAS_BACKEND", DEFAULT)
    extra = EXTRAS.get(wanted, EXTRAS[backend])
    gpu = ' (or `".[gpu]"` on a machine with an NVIDIA GPU)' if extra == "cpu" else ""
    return BackendError(f"the Keras backend {wanted} needs {backend}, which is not installed; install the project "
                        f'with `pip install -e ".[{extra}]"`{gpu}, or choose another with --backend')


def keep_tensorflow_out() -> None:
    """On JAX and PyTorch, Keras imports TensorFlow wherever it is installed (to seed it, to serialize its
    types): 1-2 s and ~0.5 GB that those backends never use. Tell Keras it is absent."""
    import keras
    from keras.src.utils import module_utils

    if keras.backend.backend() != "tensorflow" and "tensorflow" not in sys.modules:
        module_utils.tensorflow._available = False


def gpu_count() -> int:
    """GPUs the backend sees."""
    backend = current()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(device.platform == "gpu" for device in jax.devices())
    import torch

    return torch.cuda.device_count()


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """What the backend raises when a batch does not fit on the device (a failed trial, not a failed worker)."""
    backend = current()
    if backend == "tensorflow":
        import tensorflow as tf

        return (tf.errors.ResourceExhaustedError,)
    if backend == "torch":
        import torch

        return (torch.OutOfMemoryError,)
    from jax.errors import JaxRuntimeError  # XLA's one runtime error: RESOURCE_EXHAUSTED among others

    return (JaxRuntimeError,)
