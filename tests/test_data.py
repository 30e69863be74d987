"""cifar_mlops.data on generated canonical CIFAR-10 files, synthetic data and (when present) the real sample."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifar_mlops import data
from cifar_mlops.config import AugmentConfig, DataConfig
from cifar_mlops.data import DataError

REAL_SAMPLE = Path("/work/shared/data/cifar10-sample/cifar-10-batches-py")
PER_BATCH = 20  # images per generated batch: 100 train + 20 test


# ---------------------------------------------------------------------------
# Helpers: a canonical cifar-10-batches-py folder and its .tar.gz, generated


def make_batches_folder(root: Path, per_batch: int = PER_BATCH, seed: int = 0):
    """Write a tiny canonical folder (pickles as in the original) -> (folder, x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    folder = root / data.FOLDER_NAME
    folder.mkdir(parents=True)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in data.CLASS_NAMES], b"num_vis": 3072}
    _dump(meta, folder / "batches.meta")
    arrays = {}
    for name in [*data.TRAIN_BATCHES, data.TEST_BATCH]:
        x = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)  # HWC, as returned
        y = np.arange(per_batch) % 10
        flat = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CHW rows, as stored
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": flat,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        _dump(batch, folder / name)
        arrays[name] = (x, y)
    x_train = np.concatenate([arrays[n][0] for n in data.TRAIN_BATCHES])
    y_train = np.concatenate([arrays[n][1] for n in data.TRAIN_BATCHES])
    return folder, x_train, y_train, *arrays[data.TEST_BATCH]


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_archive(folder: Path, dest: Path) -> tuple[Path, str]:
    """Tar `folder` as cifar-10-batches-py/ into a .tar.gz -> (archive, md5)."""
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=data.FOLDER_NAME)
    return dest, hashlib.md5(dest.read_bytes()).hexdigest()


@pytest.fixture
def folder(tmp_path):
    return make_batches_folder(tmp_path / "src")


@pytest.fixture
def archive(folder, tmp_path):
    return make_archive(folder[0], tmp_path / data.ARCHIVE_NAME)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test reads the user's CIFAR10_DIR or cache, or reaches the network."""
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("CIFAR_MLOPS_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setattr(data, "CIFAR10_URL", (tmp_path / "no-such-archive.tar.gz").as_uri())


def synthetic_cfg(**overrides) -> DataConfig:
    return DataConfig(**{"source": "synthetic", "val_size": 200, "synthetic_train_pool": 1000,
                         "synthetic_test_pool": 200, **overrides})


# ---------------------------------------------------------------------------
# Reading the canonical format


def test_read_batches_folder_round_trips_pixels(folder):
    path, x_train, y_train, x_test, y_test = folder
    xr, yr, xt, yt, names = data.read_batches_folder(path)
    assert xr.shape == (5 * PER_BATCH, 32, 32, 3) and xr.dtype == np.uint8
    assert xt.shape == (PER_BATCH, 32, 32, 3) and yr.dtype == yt.dtype == np.int64
    np.testing.assert_array_equal(xr, x_train)
    np.testing.assert_array_equal(yr, y_train)
    np.testing.assert_array_equal(xt, x_test)
    np.testing.assert_array_equal(yt, y_test)
    assert names == data.CLASS_NAMES
    # The stored row is channels first: red plane, then green, then blue, each row-major.
    stored = pickle.load(open(path / "data_batch_1", "rb"), encoding="bytes")[b"data"]
    i, r, c, ch = 3, 5, 17, 2
    assert stored[i, ch * 1024 + r * 32 + c] == xr[i, r, c, ch]


def test_missing_batch_file_is_named(folder):
    (folder[0] / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        data.read_batches_folder(folder[0])


def test_truncated_pickle_is_named(folder):
    path = folder[0] / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"test_batch is truncated or corrupt") as err:
        data.read_batches_folder(folder[0])
    assert "\n" not in str(err.value)


def test_pickle_with_foreign_objects_is_refused(folder):
    _dump({b"data": os.system}, folder[0] / "data_batch_1")  # pickles a reference to os.system
    with pytest.raises(DataError, match="data_batch_1 is truncated or corrupt.*unexpected object"):
        data.read_batches_folder(folder[0])


def test_wrong_array_shape_is_rejected(folder):
    _dump({b"data": np.zeros((4, 1000), np.uint8), b"labels": [0] * 4}, folder[0] / "data_batch_2")
    with pytest.raises(DataError, match=r"data_batch_2: expected uint8 data of shape \(N, 3072\)"):
        data.read_batches_folder(folder[0])


# ---------------------------------------------------------------------------
# Archives and downloads


def test_extract_archive_checks_md5_and_extracts(folder, archive, tmp_path):
    path, md5 = archive
    out = data.extract_archive(path, tmp_path / "cache", md5=md5)
    assert out == tmp_path / "cache" / data.FOLDER_NAME
    np.testing.assert_array_equal(data.read_batches_folder(out)[0], folder[1])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.FOLDER_NAME]  # no temp folders left


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_damaged_archive_is_rejected(archive, tmp_path, damage):
    path, md5 = archive
    content = bytearray(path.read_bytes())
    if damage == "flip_byte":
        content[len(content) // 2] ^= 0xFF
    else:
        del content[len(content) // 2 :]
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=rf"{path.name} is damaged.*expected {md5}.*delete it and rerun"):
        data.extract_archive(path, tmp_path / "cache", md5=md5)
    assert not (tmp_path / "cache" / data.FOLDER_NAME).exists()


def test_download_from_file_url(archive, tmp_path, capsys):
    path, md5 = archive
    dest = tmp_path / "cache" / data.ARCHIVE_NAME
    assert data.download(path.as_uri(), dest, md5) == dest
    assert dest.read_bytes() == path.read_bytes()
    assert "downloading" in capsys.readouterr().err
    assert sorted(p.name for p in dest.parent.iterdir()) == [data.ARCHIVE_NAME]


def test_download_with_wrong_md5_leaves_nothing(archive, tmp_path):
    dest = tmp_path / "cache" / data.ARCHIVE_NAME
    with pytest.raises(DataError, match="md5"):
        data.download(archive[0].as_uri(), dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_download_failure_says_where_to_put_the_file(tmp_path):
    dest = tmp_path / "cache" / data.ARCHIVE_NAME
    with pytest.raises(DataError, match=f"download it by hand and put it at {dest}.*--data-dir"):
        data.download((tmp_path / "missing.tar.gz").as_uri(), dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []


# ---------------------------------------------------------------------------
# Locating the folder


def test_locate_precedence(tmp_path, monkeypatch):
    given = make_batches_folder(tmp_path / "given")[0]
    env = make_batches_folder(tmp_path / "env")[0]
    cache = tmp_path / "cache"
    cached = make_batches_folder(cache)[0]
    monkeypatch.setenv("CIFAR10_DIR", str(env))
    assert data.locate_cifar10(DataConfig(data_dir=str(given), cache_dir=str(cache))) == given
    assert data.locate_cifar10(DataConfig(cache_dir=str(cache))) == env
    monkeypatch.delenv("CIFAR10_DIR")
    assert data.locate_cifar10(DataConfig(cache_dir=str(cache))) == cached
    monkeypatch.setenv("CIFAR_MLOPS_CACHE", str(cache))
    assert data.locate_cifar10(DataConfig()) == cached
    # The folder holding cifar-10-batches-py works too.
    assert data.locate_cifar10(DataConfig(data_dir=str(given.parent))) == given


def test_locate_downloads_and_extracts_into_cache(archive, tmp_path, monkeypatch):
    path, md5 = archive
    monkeypatch.setattr(data, "CIFAR10_URL", path.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    cache = tmp_path / "cache"
    out = data.locate_cifar10(DataConfig(cache_dir=str(cache)))
    assert out == cache / data.FOLDER_NAME and (cache / data.ARCHIVE_NAME).is_file()
    (cache / data.ARCHIVE_NAME).write_bytes(b"never read again: the extracted folder is used")
    assert data.locate_cifar10(DataConfig(cache_dir=str(cache))) == out


def test_locate_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass --data-dir.*CIFAR10_DIR.*download"):
        data.locate_cifar10(DataConfig(data_dir=str(tmp_path / "nope")))


# ---------------------------------------------------------------------------
# Splits


def test_load_splits_from_folder(folder):
    splits = data.load_splits(DataConfig(data_dir=str(folder[0]), val_size=20, train_size=50, test_size=10))
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (50, 20, 10)
    assert splits.x_train.dtype == np.uint8 and splits.x_train.shape[1:] == (32, 32, 3)
    assert splits.source == "cifar10-partial" and splits.location == str(folder[0])
    assert splits.num_classes == 10 and splits.class_names == data.CLASS_NAMES
    # train and val are disjoint images of the training pool
    rows = {bytes(img) for img in splits.x_train}
    assert not rows & {bytes(img) for img in splits.x_val}


def test_stratified_split_is_balanced_random_is_not():
    stratified = data.load_splits(synthetic_cfg(split="stratified", train_size=500, test_size=100))
    assert set(np.bincount(stratified.y_val)) == {20}
    assert set(np.bincount(stratified.y_train)) == {50}
    assert set(np.bincount(stratified.y_test)) == {10}
    random = data.load_splits(synthetic_cfg(split="random", train_size=500, test_size=100))
    assert len(set(np.bincount(random.y_val, minlength=10))) > 1
    assert len(random.y_val) == 200 and len(random.y_train) == 500 and len(random.y_test) == 100


def test_splits_are_deterministic_and_fingerprinted():
    a, b = data.load_splits(synthetic_cfg()), data.load_splits(synthetic_cfg())
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert a.fingerprint == b.fingerprint and a.source_checksum == b.source_checksum
    assert a.location == "synthetic(seed=0)" and a.source == "synthetic"
    other_seed = data.load_splits(synthetic_cfg(seed=1))
    other_kind = data.load_splits(synthetic_cfg(split="random"))
    assert len({a.fingerprint, other_seed.fingerprint, other_kind.fingerprint}) == 3
    assert not np.array_equal(a.y_val, other_kind.y_val)


def test_fingerprint_changes_with_seed_on_the_same_files(folder):
    first = data.load_splits(DataConfig(data_dir=str(folder[0]), val_size=20, seed=0))
    second = data.load_splits(DataConfig(data_dir=str(folder[0]), val_size=20, seed=1))
    assert first.source_checksum == second.source_checksum
    assert first.fingerprint != second.fingerprint


def test_sizes_too_large_is_one_clear_line(folder):
    with pytest.raises(DataError) as err:
        data.load_splits(DataConfig(data_dir=str(folder[0]), train_size=90, val_size=20))
    message = str(err.value)
    assert "train_size (90)" in message and "val_size (20)" in message and "100 training images" in message
    assert "--set data.train_size=" in message and "--set data.val_size=" in message and "\n" not in message
    with pytest.raises(DataError, match="test_size"):
        data.load_splits(DataConfig(data_dir=str(folder[0]), val_size=20, test_size=21))


# ---------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_and_shaped():
    first, second = data.synthetic_arrays(100, 30, seed=3), data.synthetic_arrays(100, 30, seed=3)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    x, y, xt, yt = first
    assert x.shape == (100, 32, 32, 3) and xt.shape == (30, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and set(np.bincount(y)) == {10}
    assert not np.array_equal(x, data.synthetic_arrays(100, 30, seed=4)[0])


def test_synthetic_is_learnable():
    x, y, xt, yt = data.synthetic_arrays(1000, 300, seed=0)
    flat, flat_test = x.reshape(len(x), -1).astype(np.float32), xt.reshape(len(xt), -1).astype(np.float32)
    means = np.stack([flat[y == c].mean(axis=0) for c in range(10)])
    distances = ((flat_test[:, None, :] - means[None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == yt).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.1


# ---------------------------------------------------------------------------
# tf.data pipelines and class weights


def _epoch(ds) -> tuple[np.ndarray, np.ndarray]:
    batches = [(img.numpy(), lab.numpy()) for img, lab in ds]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_make_dataset_shapes_and_order():
    x, y, _, _ = data.synthetic_arrays(50, 10, seed=0)
    ds = data.make_dataset(x, y, batch_size=16, num_classes=10, training=False)
    images, labels = next(iter(ds))
    assert images.dtype.name == "uint8" and tuple(images.shape) == (16, 32, 32, 3)
    assert labels.dtype.name == "float32" and tuple(labels.shape) == (16, 10)
    all_images, all_labels = _epoch(ds)
    np.testing.assert_array_equal(all_images, x)  # fixed order, untouched
    np.testing.assert_array_equal(all_labels.argmax(axis=1), y)
    assert set(all_labels.sum(axis=1)) == {1.0}


def test_training_reshuffles_each_epoch_and_augments():
    # One class per image: the one-hot label tells which image a batch row came from.
    n = 48
    x, _, _, _ = data.synthetic_arrays(n, 10, seed=0)
    ids = np.arange(n)
    plain = data.make_dataset(x, ids, batch_size=16, num_classes=n, training=True, seed=1)
    (first, first_labels), (_, second_labels) = _epoch(plain), _epoch(plain)
    order, order2 = first_labels.argmax(axis=1), second_labels.argmax(axis=1)
    assert sorted(order) == list(ids) and not np.array_equal(order, order2)
    np.testing.assert_array_equal(first, x[order])

    augment = AugmentConfig(flip=True, rotation=20, translation=0.1, blur_sigma=1.5)
    augmented = data.make_dataset(x, ids, batch_size=16, num_classes=n, training=True, augment=augment, seed=1)
    images, labels = _epoch(augmented)
    assert images.dtype == np.uint8 and images.shape == x.shape
    changed = (images != x[labels.argmax(axis=1)]).reshape(n, -1).any(axis=1)
    assert changed.mean() > 0.9
    again, _ = _epoch(data.make_dataset(x, ids, batch_size=16, num_classes=n, training=True, augment=augment, seed=1))
    np.testing.assert_array_equal(images, again)  # same seed, same augmented epoch

    evaluation = data.make_dataset(x, ids, batch_size=16, num_classes=n, training=False, augment=augment)
    np.testing.assert_array_equal(_epoch(evaluation)[0], x)


def test_blur_smooths_images():
    x, _, _, _ = data.synthetic_arrays(32, 10, seed=0)
    ds = data.make_dataset(x, np.zeros(32, int), batch_size=32, num_classes=10, training=True,
                           augment=AugmentConfig(blur_sigma=3.0))
    blurred = _epoch(ds)[0].astype(float)

    def roughness(images):
        return np.abs(np.diff(images.astype(float), axis=2)).mean()

    assert roughness(blurred) < 0.8 * roughness(x)
    assert abs(blurred.mean() - x.mean()) < 3  # blur keeps the brightness


def test_class_weights_balanced():
    y = np.array([0] * 10 + [1] * 30)
    assert data.class_weights(y, 3) == pytest.approx({0: 2.0, 1: 40 / 60, 2: 1.0})
    assert data.class_weights(np.arange(20) % 4, 4) == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})


# ---------------------------------------------------------------------------
# The real sample


@pytest.mark.skipif(not REAL_SAMPLE.exists(), reason=f"real CIFAR-10 sample not present at {REAL_SAMPLE}")
def test_real_sample():
    splits = data.load_splits(DataConfig(data_dir=str(REAL_SAMPLE), val_size=500))
    assert splits.source == "cifar10-partial"
    assert len(splits.y_train) + len(splits.y_val) == 4170 and len(splits.y_test) == 1000
    assert splits.class_names == data.CLASS_NAMES
    for labels in (splits.y_train, splits.y_val, splits.y_test):
        assert set(labels) == set(range(10))
    assert splits.x_train.dtype == np.uint8 and splits.x_train.shape[1:] == (32, 32, 3)
    assert 60 < splits.x_train.mean() < 200  # natural images, not noise or zeros
