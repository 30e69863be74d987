"""Which Keras backend trains (TensorFlow, JAX or PyTorch), what it needs, and the GPUs it sees.

The backend is Keras's own choice: $KERAS_BACKEND (which `cifar-mlops --backend` sets before
Keras is imported, so that tuning and ablation workers inherit it), else Keras's config file,
else TensorFlow. Only the standard library is imported here; the backend's own module
is imported inside the functions that ask it something.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

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
    types): seconds of import and its memory, for nothing those backends use. Tell Keras it is absent
    (a private flag: Keras 3.15 has no public switch; tests/test_backends.py fails if it stops working)."""
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


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports bfloat16 arithmetic (AVX512-BF16 or AMX); False where it cannot be read
    (not Linux): there bfloat16 would be emulated, several times slower than float32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


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


@contextlib.contextmanager
def data_parallel(devices: int | str, batch_size: int) -> Iterator[int]:
    """Models built and trained inside are replicated over `devices` (1, N or "all"), each step's `batch_size`
    images split evenly between them; yields how many (see `_replicas`)."""
    with _replicas(devices) as count:
        if batch_size % count:
            raise BackendError(f"train.batch_size={batch_size} does not split evenly between {count} devices; "
                               f"choose a multiple of {count}")
        yield count


@contextlib.contextmanager
def _replicas(devices: int | str) -> Iterator[int]:
    """The devices of a data-parallel training, in scope; yields how many. GPUs where the backend sees any,
    else the CPU's devices:
    - TensorFlow: `tf.distribute.MirroredStrategy`; without GPUs the CPU is split into N logical devices
      (possible only before TensorFlow first runs an op in this process);
    - JAX: `keras.distribution.DataParallel`; without GPUs, JAX's CPU devices, as many as
      XLA_FLAGS=--xla_force_host_platform_device_count=N makes;
    - PyTorch: one device; N > 1 is refused (Keras 3.15 has no data-parallel training for PyTorch).
    Inside a scope already open (a resumed training loads its model in it, then trains), it opens none.
    """
    name = current()
    if devices == 1:
        yield 1
    elif name == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy():
            yield tf.distribute.get_strategy().num_replicas_in_sync
            return
        chosen = _tensorflow_devices(tf, devices)
        if len(chosen) == 1:
            yield 1
            return
        with tf.distribute.MirroredStrategy(chosen).scope():
            yield len(chosen)
    elif name == "jax":
        import jax
        import keras

        if keras.distribution.distribution() is not None:
            yield len(keras.distribution.distribution().device_mesh.devices.flatten())
            return
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        available = gpus or jax.devices("cpu")
        count = len(available) if devices == "all" else devices
        if count > len(available):
            where = (f"{len(gpus)} GPUs" if gpus else f"{len(available)} CPU devices (set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={count} for more)")
            raise BackendError(f"train.devices={devices} but JAX sees {where}; lower train.devices")
        if count == 1:
            yield 1
            return
        with keras.distribution.DataParallel(devices=available[:count]).scope():
            yield count
    elif devices == "all":
        yield 1
    else:
        raise BackendError(f"train.devices={devices} needs the tensorflow or jax backend: Keras 3.15 trains on one "
                           "device with PyTorch; set train.devices=1 or choose --backend jax")


def _tensorflow_devices(tf, devices: int | str) -> list[str]:
    # physical devices and logical device configurations are read without starting TensorFlow's runtime,
    # which would fix its devices
    if tf.config.list_physical_devices("GPU"):
        gpus = tf.config.list_logical_devices("GPU")
        count = len(gpus) if devices == "all" else devices
        if count > len(gpus):
            raise BackendError(f"train.devices={devices} but TensorFlow sees {len(gpus)} GPUs; lower train.devices")
        return [d.name for d in gpus[:count]]
    if devices != "all":
        cpu = tf.config.list_physical_devices("CPU")[0]
        if len(tf.config.get_logical_device_configuration(cpu) or [None]) < devices:
            try:
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
            except RuntimeError:  # TensorFlow has run already: its devices are fixed
                raise BackendError(f"train.devices={devices}: TensorFlow has run in this process and cannot split "
                                   "the CPU into devices any more; train in a new process") from None
    cpus = tf.config.list_logical_devices("CPU")
    return [d.name for d in (cpus if devices == "all" else cpus[:devices])]
