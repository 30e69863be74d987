"""CIFAR-10 sources, train/val/test splits, the training order and class weights.

Images stay uint8 (N, 32, 32, 3) in memory; `cifar_mlops.pipeline` batches and augments
them and models resize internally. Only numpy is imported at module level: keras and
scikit-learn are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifar_mlops.errors import UserError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from cifar_mlops.config import DataConfig

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
# keras.utils.get_file(ARCHIVE_NAME, extract=True) extracts into this folder beside the archive (Keras 3).
EXTRACTED_NAME = ARCHIVE_NAME.split(".")[0] + "_extracted"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
FULL_TRAIN, FULL_TEST = 50_000, 10_000
SYNTHETIC_CLASS_NAMES: tuple[str, ...] = tuple(f"synthetic_{i}" for i in range(10))


class DataError(UserError):
    """The images cannot be had as asked (missing, truncated or tampered files, a split that does not fit)."""


@dataclass(frozen=True)
class Splits:
    x_train: np.ndarray  # uint8 (N, 32, 32, 3)
    y_train: np.ndarray  # int64 (N,)
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str  # "cifar10", "cifar10-partial" or "synthetic"
    location: str  # folder read, or "synthetic(seed=..)"
    source_checksum: str  # sha256 of the source files (synthetic: of the generated arrays)
    fingerprint: str  # sha256 of source_checksum + split kind/seed + chosen indices
    test_indices: np.ndarray  # int64 (N_test,): position of each test image in the source's test set

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def by_split(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{"train": (x, y), "val": (x, y), "test": (x, y)}: what every evaluation walks through."""
        return {"train": (self.x_train, self.y_train), "val": (self.x_val, self.y_val),
                "test": (self.x_test, self.y_test)}


# ---------------------------------------------------------------------------
# Splits


def load_splits(cfg: DataConfig) -> Splits:
    """Read (or generate) the source named by `cfg` and split it into train/val/test."""
    if cfg.source == "synthetic":
        x_pool, y_pool, x_test, y_test = synthetic_arrays(cfg.synthetic_train_pool, cfg.synthetic_test_pool, cfg.seed)
        class_names = SYNTHETIC_CLASS_NAMES
        source, location = "synthetic", f"synthetic(seed={cfg.seed})"
        checksum = _sha256_arrays(x_pool, y_pool, x_test, y_test)
    else:
        folder = locate_cifar10(cfg)
        x_pool, y_pool, x_test, y_test, class_names = read_batches_folder(folder)
        full = len(x_pool) == FULL_TRAIN and len(x_test) == FULL_TEST
        source, location = ("cifar10" if full else "cifar10-partial"), str(folder)
        checksum = _sha256_files([folder / name for name in (META_FILE, *TRAIN_BATCHES, TEST_BATCH)])

    train_idx, val_idx, test_idx = _split_indices(cfg, y_pool, y_test)
    fingerprint = hashlib.sha256(f"{checksum}|{cfg.split}|{cfg.seed}".encode())
    for idx in (train_idx, val_idx, test_idx):
        fingerprint.update(b"|" + idx.astype("<i8").tobytes())
    return Splits(
        x_train=x_pool[train_idx], y_train=y_pool[train_idx],
        x_val=x_pool[val_idx], y_val=y_pool[val_idx],
        x_test=x_test[test_idx], y_test=y_test[test_idx],
        class_names=tuple(class_names), source=source, location=location,
        source_checksum=checksum, fingerprint=fingerprint.hexdigest(), test_indices=test_idx,
    )


def _split_indices(cfg: DataConfig, y_pool: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sorted indices of train and val (into the training pool) and of test (into the test set)."""
    available = len(y_pool)
    wanted_train = cfg.train_size if cfg.train_size is not None else max(available - cfg.val_size, 0)
    if cfg.val_size + wanted_train > available or wanted_train == 0:
        raise DataError(
            f"data.train_size ({cfg.train_size if cfg.train_size is not None else 'all the rest'}) + "
            f"data.val_size ({cfg.val_size}) do not fit in the {available} training images available; "
            f"lower them, e.g. --set data.train_size={max(available - cfg.val_size, available * 4 // 5)} "
            f"--set data.val_size={min(cfg.val_size, available // 5)}"
        )
    if cfg.test_size is not None and cfg.test_size > len(y_test):
        raise DataError(
            f"data.test_size ({cfg.test_size}) is more than the {len(y_test)} test images available; "
            f"lower it, e.g. --set data.test_size={len(y_test)}, or leave it unset to use them all"
        )
    pool = np.arange(available)
    rest, val = _draw(pool, y_pool, cfg.val_size, cfg, "val")
    train = rest if cfg.train_size is None else _draw(rest, y_pool[rest], cfg.train_size, cfg, "train")[1]
    test = np.arange(len(y_test))
    if cfg.test_size is not None:
        test = _draw(test, y_test, cfg.test_size, cfg, "test")[1]
    return np.sort(train), np.sort(val), np.sort(test)


def _draw(idx: np.ndarray, labels: np.ndarray, n: int, cfg: DataConfig, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx` into (the rest, `n` drawn) by cfg.split with seed cfg.seed."""
    if n >= len(idx):
        return idx[:0], idx
    seed = cfg.seed % 2**32
    if cfg.split == "random":
        order = np.random.default_rng(seed).permutation(len(idx))
        return idx[order[n:]], idx[order[:n]]
    from sklearn.model_selection import train_test_split

    try:
        rest, drawn = train_test_split(idx, test_size=n, stratify=labels, random_state=seed)
    except ValueError as err:
        raise DataError(
            f"cannot draw a stratified {what} split of {n} images ({err}); "
            "use bigger sizes or --set data.split=random"
        ) from None
    return rest, drawn


# ---------------------------------------------------------------------------
# Locating, downloading and reading CIFAR-10


def locate_cifar10(cfg: DataConfig) -> Path:
    """A cifar-10-batches-py folder: cfg.data_dir, $CIFAR10_DIR, else the one in the cache (downloaded once)."""
    for given, origin in ((cfg.data_dir, "data.data_dir (--data-dir)"), (os.environ.get("CIFAR10_DIR"), "CIFAR10_DIR")):
        if given:
            return _batches_folder(Path(given).expanduser(), origin)
    return fetch_cifar10(cache_folder(cfg))


def cache_folder(cfg: DataConfig) -> Path:
    """data.cache_dir, else $CIFAR_MLOPS_CACHE, else ~/.cache/cifar-mlops."""
    folder = cfg.cache_dir or os.environ.get("CIFAR_MLOPS_CACHE") or Path.home() / ".cache" / "cifar-mlops"
    return Path(folder).expanduser()


def _batches_folder(folder: Path, origin: str) -> Path:
    if (folder / FOLDER_NAME).is_dir():  # the folder that holds cifar-10-batches-py
        folder = folder / FOLDER_NAME
    if not folder.is_dir():
        raise DataError(
            f"{origin}: CIFAR-10 folder {folder} does not exist; pass --data-dir <cifar-10-batches-py folder>, "
            "set CIFAR10_DIR to it, or set neither to download CIFAR-10 automatically"
        )
    return folder


def read_batches_folder(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read a canonical cifar-10-batches-py folder -> (x_train, y_train, x_test, y_test, class_names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"CIFAR-10 folder {folder} does not exist; pass --data-dir <cifar-10-batches-py folder>")
    meta = _load_pickle(folder / META_FILE)
    try:
        class_names = tuple(_text(name) for name in meta[b"label_names"])
    except (KeyError, TypeError, UnicodeDecodeError):
        raise DataError(f"{folder / META_FILE} has no valid label_names; restore the file from the original archive") from None
    train = [_read_batch(folder / name, len(class_names)) for name in TRAIN_BATCHES]
    x_test, y_test = _read_batch(folder / TEST_BATCH, len(class_names))
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test, class_names


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    try:
        data, labels = batch[b"data"], batch[b"labels"]
        data = np.asarray(data)
        labels = np.asarray(labels, dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path} is not a CIFAR-10 batch (no data/labels); restore it from the original archive") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected uint8 data of shape (N, 3072) and N labels, got {data.dtype} {data.shape} "
            f"and {labels.shape[0] if labels.ndim else 0} labels; restore it from the original archive"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}; restore it from the original archive")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> HWC
    return np.ascontiguousarray(images), labels


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: plain containers and numpy arrays, nothing executable."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),  # bytes in pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(*self.ALLOWED[(module, name)])


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(
            f"{path.name} is missing from {path.parent}; it is not a complete cifar-10-batches-py folder "
            "(re-extract cifar-10-python.tar.gz or pass another --data-dir)"
        )
    try:
        with open(path, "rb") as f:
            content = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, MemoryError) as err:
        detail = first_line(err)
        raise DataError(
            f"{path} is truncated or corrupt ({detail}); delete the folder and extract or download CIFAR-10 again"
        ) from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a CIFAR-10 pickle (no dict inside); restore it from the original archive")
    return content


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def fetch_cifar10(cache: str | os.PathLike, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """cache/cifar-10-batches-py, extracted from cache/cifar-10-python.tar.gz, which is downloaded from `url` if absent.

    An extracted folder is used as it is (no network); an archive already in the cache (placed there by hand
    when offline) is used when its md5 is `md5`, and refused otherwise (never replaced or deleted). Downloading,
    checking the md5 and extracting are keras.utils.get_file's; every failure is a one-line DataError.
    """
    cache = Path(cache).expanduser().absolute()
    target = cache / FOLDER_NAME
    if (target / TEST_BATCH).is_file():
        return target
    archive = cache / ARCHIVE_NAME
    by_hand = f"download {url} by hand and put it at {archive}, or pass --data-dir <an extracted {FOLDER_NAME} folder>"
    # get_file would re-download an archive whose hash differs, and delete it when that fails (offline).
    if archive.is_file() and (actual := _md5(archive)) != md5:
        raise DataError(
            f"{archive} is damaged or incomplete: md5 {actual}, expected {md5}; delete it and rerun to download "
            f"it again, or {by_hand}"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the data cache {cache} ({err.strerror or err}); set data.cache_dir or "
                        "CIFAR_MLOPS_CACHE to a writable folder, or pass --data-dir") from None
    staging = cache / EXTRACTED_NAME
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted extraction
    import keras

    try:
        # An absolute cache_subdir pins the folder: get_file would fall back to /tmp/.keras for an unwritable one.
        # Its progress goes to stderr, as all progress does, keeping stdout for results.
        with contextlib.redirect_stdout(sys.stderr):
            extracted = Path(keras.utils.get_file(
                ARCHIVE_NAME, url, file_hash=md5, hash_algorithm="md5", extract=True,
                cache_dir=str(cache), cache_subdir=str(cache),
            ))
        inner = extracted / FOLDER_NAME
        if not inner.is_dir():
            raise DataError(f"{archive} has no {FOLDER_NAME}/ folder inside; delete it and rerun to download again")
        if target.exists():  # an incomplete folder (no test_batch): replaced whole
            shutil.rmtree(target)
        inner.rename(target)
        return target
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - keras.utils.get_file raises a bare Exception for network errors
        raise _fetch_error(err, archive, url, md5, by_hand) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_error(err: Exception, archive: Path, url: str, md5: str, by_hand: str) -> DataError:
    """The DataError for what keras.utils.get_file raised, told apart by what it left behind."""
    detail = first_line(err)
    if not archive.is_file():  # get_file deletes the archive when the download fails
        # "URL fetch failure on <url>: <HTTP code or None> -- <reason>" -> "HTTP 404: File not found" / the reason
        head, sep, reason = detail.rpartition(" -- ")
        code = head.rpartition(": ")[2]
        if sep:
            detail = f"HTTP {code}: {reason}" if code.isdigit() else reason
        return DataError(f"could not download {url} ({detail}); {by_hand}")
    if (actual := _md5(archive)) != md5:  # downloaded, but not the file expected: get_file leaves it
        archive.unlink(missing_ok=True)
        return DataError(
            f"download of {url} is damaged: md5 {actual}, expected {md5}; rerun to try again, or {by_hand}"
        )
    return DataError(f"{archive} could not be extracted ({detail}); delete it and rerun to download again")


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _sha256_files(paths: list[Path]) -> str:
    """sha256 of the files' contents one after the other (what runs record as data.source_checksum)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            hashlib.file_digest(f, lambda: digest)  # feeds this file into the one running digest
    return digest.hexdigest()


def _sha256_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Synthetic data


def synthetic_arrays(n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-shaped uint8 images of 10 classes, deterministic per seed.

    Each class is a colour plus a striped pattern of its own orientation and
    frequency; every image gets a random phase, brightness and pixel noise.
    Classes are balanced (n // 10 each, the remainder spread over the first ones).
    """
    rng = np.random.default_rng(seed % 2**32)
    templates = np.random.default_rng(12345)  # the classes are the same for every seed
    colours = templates.uniform(40, 215, size=(10, 3))
    angles = np.arange(10) * np.pi / 10
    freqs = 2 * np.pi * np.array([2, 3, 4, 2, 3, 4, 2, 3, 4, 3]) / 32

    def generate(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % 10).astype(np.int64)
        rows, cols = np.mgrid[0:32, 0:32].astype(np.float32)
        projection = np.cos(angles[y])[:, None, None] * cols + np.sin(angles[y])[:, None, None] * rows
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        stripes = np.sin(freqs[y][:, None, None] * projection + phase)[..., None]  # (n, 32, 32, 1)
        brightness = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
        images = colours[y][:, None, None, :] * brightness + 45 * stripes + rng.normal(0, 20, size=(n, 32, 32, 3))
        return np.clip(np.round(images), 0, 255).astype(np.uint8), y

    x_train, y_train = generate(n_train)
    x_test, y_test = generate(n_test)
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------------
# The order of the training images (batches: cifar_mlops.pipeline)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the `n` training images (a permutation of 0..n-1)."""
    return np.random.default_rng([seed % 2**32, epoch]).permutation(n)


# ---------------------------------------------------------------------------
# Class weights


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """"balanced" weights n / (k * count) per class (sklearn); classes absent from `y` get 1.0."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    result = {c: 1.0 for c in range(num_classes)}
    result.update({int(c): float(w) for c, w in zip(present, weights)})
    return result
