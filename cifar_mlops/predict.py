"""`cifar-mlops predict`: a logged model over image files and folders, one table row per file.

Files are decoded with the served model's own `image_model.decode_image` (so a file predicts
here what it would through `mlflow models serve`) and fed to the model in batches; a file that
cannot be read or decoded gets its reason in the `error` column and the others go on.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cifar_mlops.errors import UserError, first_line
from cifar_mlops.progress import log
from cifar_mlops.tracking import image_model, runs, served

PATH, ERROR = "path", "error"
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PredictError(UserError):
    """The paths, the model or the output cannot be used; the message says which and why."""

    exit_code = 2


def image_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and every file under the folders named (recursively, sorted, hidden ones skipped)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise PredictError(f"folder {name} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise PredictError(f"{name}: no such file or folder")
    return files


def output_format(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise PredictError(f"--out {out}: name a .csv or .jsonl file")
    return FORMATS[suffix]


def _decoded(files: Sequence[Path]) -> tuple[np.ndarray, list[str]]:
    """The files' pixels (a zero image where one fails) and, per file, why it failed ('' if it did not)."""
    pixels = np.zeros((len(files), image_model.IMAGE_SIZE, image_model.IMAGE_SIZE, 3), np.uint8)
    errors = [""] * len(files)
    for i, file in enumerate(files):
        try:
            pixels[i] = image_model.decode_image(file.read_bytes())
        except OSError as err:
            errors[i] = f"cannot read the file: {err.strerror or err}"
        except image_model.BadImage as err:
            errors[i] = f"the file {err}"
    return pixels, errors


def _batches(files: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(files), size):
        yield files[start:start + size]


def ranked(table: pd.DataFrame, class_names: Sequence[str], top_k: int) -> pd.DataFrame:
    """The prediction table with its class columns replaced by the `top_k` most probable classes."""
    probabilities = table[list(class_names)].to_numpy()
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    names = np.asarray(class_names, dtype=object)
    columns = {image_model.LABEL: names[order[:, 0]],
               image_model.PROBABILITY: np.take_along_axis(probabilities, order[:, :1], axis=1)[:, 0]}
    for k in range(1, top_k):
        columns[f"label_{k + 1}"] = names[order[:, k]]
        columns[f"probability_{k + 1}"] = np.take_along_axis(probabilities, order[:, k:k + 1], axis=1)[:, 0]
    return pd.DataFrame(columns, index=table.index)


def predict(model_uri: str, paths: Sequence[str], batch_size: int = 256, top_k: int = 0) -> pd.DataFrame:
    """One row per file: path, label, probability, every class's probability (or the top k), error."""
    files = image_files(paths)
    log(f"loading {model_uri}")
    try:
        answer = served.predictor(model_uri, batch_size)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for a URI it cannot resolve or load
        raise PredictError(f"cannot load model {model_uri!r}: {first_line(err)}") from None
    tables = []
    done = 0
    for batch in _batches(files, batch_size):
        pixels, errors = _decoded(batch)
        table = answer(pixels)
        class_names = [c for c in table.columns if c not in (image_model.LABEL, image_model.PROBABILITY)]
        if top_k > len(class_names):
            raise PredictError(f"--top-k {top_k} is more than the model's {len(class_names)} classes")
        if top_k:
            table = ranked(table, class_names, top_k)
        table = table.where(pd.Series([not e for e in errors], index=table.index), axis=0)  # no guess for a failure
        table.insert(0, PATH, [str(f) for f in batch])
        table[ERROR] = errors
        tables.append(table)
        done += len(batch)
        if len(files) > batch_size:
            log(f"predicted {done:,} / {len(files):,} files")
    return pd.concat(tables, ignore_index=True)


def write(table: pd.DataFrame, out: str) -> None:
    """Write the table to `out` (.csv or .jsonl) whole or not at all."""
    fmt = output_format(out)
    target = Path(out)
    try:
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise PredictError(f"cannot write {out}: {err.strerror or err}") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            if fmt == "csv":
                table.to_csv(stream, index=False)
            else:
                table.to_json(stream, orient="records", lines=True)
        os.replace(partial, target)
    except OSError as err:
        Path(partial).unlink(missing_ok=True)
        raise PredictError(f"cannot write {out}: {err.strerror or err}") from None


def log_to_adopted_run(out: str, model_uri: str, paths: Sequence[str], top_k: int) -> str | None:
    """Under `mlflow run`, the table becomes an artifact of its run; return the run id (None otherwise)."""
    return runs.log_to_adopted_run(out, params={"model": model_uri, "paths": " ".join(paths), "top_k": top_k},
                                   tags={"kind": "prediction"})
