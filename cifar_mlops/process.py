"""Process set-up for the commands that train or load models: quiet, fast heavy imports.

TensorFlow, Keras, MLflow and Optuna are imported only by the commands that
need them (inside `heavy_imports`), so `cifar-mlops --help` and `experiments`
answer at once.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile

from cifar_mlops import backend

# TensorFlow's C++ start-up notices: absl logs them before it is initialised, so they bypass
# TF_CPP_MIN_LOG_LEVEL and print on every import (twice in tensorflow-cpu 2.21).
TENSORFLOW_IMPORT_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")


@contextlib.contextmanager
def heavy_imports():
    """Import TensorFlow, Keras, MLflow or Optuna quietly with the collector paused, then freeze them.

    Their millions of module objects live as long as the process. Left in the collector's
    generations, every full collection walks them all: while MLflow imports and maps its
    SQL store, during training and again at exit, ~1.5 s per `train` run on the 2-core
    machine of benchmarks/RESULTS.md. `gc.freeze` moves them to the permanent generation;
    later garbage is collected as usual.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter (CPU features)
    gc.disable()
    try:
        with stderr_without(TENSORFLOW_IMPORT_NOISE):
            yield
    except ModuleNotFoundError as err:
        missing = backend.missing(err.name or "")
        if missing is None:
            raise
        raise missing from None
    else:
        if "keras" in sys.modules:
            backend.keep_tensorflow_out()
    finally:
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def stderr_without(noise: tuple[str, ...]):
    """Hold back what is written to file descriptor 2 (C++ code included), then pass on every line
    that contains none of `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(text in line for text in noise)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
