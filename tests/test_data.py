"""cifar_mlops.data on generated canonical CIFAR-10 files, synthetic data and (when present) the real sample."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cifar_mlops import data
from cifar_mlops.config import AugmentConfig, DataConfig
from cifar_mlops.data import DataError
from tests.conftest import SAMPLE_DIR, needs_sample

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
    """No test reads the user's CIFAR10_DIR or cache, or reaches the network (file:// and 127.0.0.1 only)."""
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("CIFAR_MLOPS_CACHE", str(tmp_path / "default-cache"))
    real_urlopen = urllib.request.urlopen

    def local_only(url, *args, **kwargs):  # urlretrieve (keras.utils.get_file) opens URLs through this
        parts = urllib.parse.urlsplit(url if isinstance(url, str) else url.full_url)
        if parts.scheme != "file" and parts.hostname != "127.0.0.1":
            raise urllib.error.URLError("tests must not reach the network")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the folder tmp_path/served -> (that folder, its base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def refused_url():
    """A URL on 127.0.0.1 whose port is held but not listening: every connection is refused, as offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{data.ARCHIVE_NAME}"


def cache_names(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


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


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_fetch_downloads_checks_and_extracts(folder, archive, server, tmp_path, capsys, scheme):
    path, md5 = archive
    served, base = server
    shutil.copy(path, served / data.ARCHIVE_NAME)
    url = f"{base}/{data.ARCHIVE_NAME}" if scheme == "http" else path.as_uri()
    cache = tmp_path / "new" / "cache"  # created on the way
    out = data.fetch_cifar10(cache, url=url, md5=md5)
    assert out == cache / data.FOLDER_NAME
    np.testing.assert_array_equal(data.read_batches_folder(out)[0], folder[1])
    # The archive stays beside the folder; Keras' <name>_extracted staging folder does not.
    assert cache_names(cache) == sorted([data.ARCHIVE_NAME, data.FOLDER_NAME])
    assert (cache / data.ARCHIVE_NAME).read_bytes() == path.read_bytes()
    captured = capsys.readouterr()
    assert f"Downloading data from {url}" in captured.err and captured.out == ""  # progress on stderr only


def test_extracted_folder_is_used_without_network(tmp_path, refused_url):
    cache = tmp_path / "cache"
    cached = make_batches_folder(cache)[0]
    (cache / data.ARCHIVE_NAME).write_bytes(b"never read: the extracted folder is used")
    assert data.fetch_cifar10(cache, url=refused_url, md5="0" * 32) == cached


def test_archive_placed_by_hand_is_used_offline(folder, archive, tmp_path, refused_url):
    path, md5 = archive
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(path, cache / data.ARCHIVE_NAME)
    out = data.fetch_cifar10(cache, url=refused_url, md5=md5)
    np.testing.assert_array_equal(data.read_batches_folder(out)[2], folder[3])
    assert cache_names(cache) == sorted([data.ARCHIVE_NAME, data.FOLDER_NAME])


def test_incomplete_folder_and_interrupted_extraction_are_replaced(folder, archive, tmp_path, refused_url):
    path, md5 = archive
    cache = tmp_path / "cache"
    (cache / data.FOLDER_NAME).mkdir(parents=True)
    (cache / data.FOLDER_NAME / "data_batch_1").write_bytes(b"half")  # no test_batch: an incomplete folder
    (cache / data.EXTRACTED_NAME / data.FOLDER_NAME).mkdir(parents=True)
    (cache / data.EXTRACTED_NAME / data.FOLDER_NAME / "stale").write_bytes(b"left by a killed run")
    shutil.copy(path, cache / data.ARCHIVE_NAME)
    out = data.fetch_cifar10(cache, url=refused_url, md5=md5)
    assert sorted(p.name for p in out.iterdir()) == sorted([data.META_FILE, *data.TRAIN_BATCHES, data.TEST_BATCH])
    np.testing.assert_array_equal(data.read_batches_folder(out)[0], folder[1])
    assert cache_names(cache) == sorted([data.ARCHIVE_NAME, data.FOLDER_NAME])


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_damaged_archive_in_cache_is_refused_and_kept(archive, server, tmp_path, damage):
    path, md5 = archive
    served, base = server
    shutil.copy(path, served / data.ARCHIVE_NAME)  # a good archive to download: it must not be
    content = bytearray(path.read_bytes())
    if damage == "flip_byte":
        content[len(content) // 2] ^= 0xFF
    else:
        del content[len(content) // 2 :]
    cache = tmp_path / "cache"
    cache.mkdir()
    placed = cache / data.ARCHIVE_NAME
    placed.write_bytes(bytes(content))
    actual = hashlib.md5(bytes(content)).hexdigest()
    with pytest.raises(DataError, match=rf"{re.escape(str(placed))} is damaged or incomplete: md5 {actual}, "
                                        rf"expected {md5}; delete it and rerun to download it again, or download "):
        data.fetch_cifar10(cache, url=f"{base}/{data.ARCHIVE_NAME}", md5=md5)
    assert placed.read_bytes() == bytes(content)  # neither replaced nor deleted (get_file would do both)
    assert cache_names(cache) == [data.ARCHIVE_NAME]


def test_download_with_wrong_md5_leaves_nothing(archive, server, tmp_path):
    path, md5 = archive
    served, base = server
    shutil.copy(path, served / data.ARCHIVE_NAME)
    cache = tmp_path / "cache"
    url = f"{base}/{data.ARCHIVE_NAME}"
    with pytest.raises(DataError, match=rf"download of {re.escape(url)} is damaged: md5 {md5}, expected 0{{32}}; "
                                        "rerun to try again, or download .* by hand and put it at") as err:
        data.fetch_cifar10(cache, url=url, md5="0" * 32)
    assert "\n" not in str(err.value)
    assert cache_names(cache) == []


@pytest.mark.parametrize("failure", ["offline", "http_404", "missing_file"])
def test_download_failure_says_where_to_put_the_file(server, refused_url, tmp_path, failure):
    url, reason = {
        "offline": (refused_url, r"\[Errno \d+\] Connection refused"),
        "http_404": (f"{server[1]}/{data.ARCHIVE_NAME}", "HTTP 404: File not found"),
        "missing_file": ((tmp_path / "missing.tar.gz").as_uri(), r"\[Errno \d+\] No such file or directory: .*"),
    }[failure]
    cache = tmp_path / "cache"
    archive = cache / data.ARCHIVE_NAME
    with pytest.raises(DataError, match=rf"^could not download {re.escape(url)} \({reason}\); download "
                                        rf"{re.escape(url)} by hand and put it at {re.escape(str(archive))}, "
                                        rf"or pass --data-dir <an extracted cifar-10-batches-py folder>$") as err:
        data.fetch_cifar10(cache, url=url, md5="0" * 32)
    assert "\n" not in str(err.value)
    assert cache_names(cache) == []


def test_archive_without_the_folder_is_refused(tmp_path, refused_url):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_bytes(b"not CIFAR-10")
    cache = tmp_path / "cache"
    cache.mkdir()
    with tarfile.open(cache / data.ARCHIVE_NAME, "w:gz") as tar:
        tar.add(tmp_path / "other", arcname="other")
    md5 = hashlib.md5((cache / data.ARCHIVE_NAME).read_bytes()).hexdigest()
    with pytest.raises(DataError, match=rf"{data.ARCHIVE_NAME} has no cifar-10-batches-py/ folder inside; delete it"):
        data.fetch_cifar10(cache, url=refused_url, md5=md5)
    assert cache_names(cache) == [data.ARCHIVE_NAME]


def test_archive_that_cannot_be_extracted_leaves_no_folder(archive, tmp_path, refused_url):
    # A truncated archive whose md5 is the expected one (so only the extraction can fail).
    content = archive[0].read_bytes()[: len(archive[0].read_bytes()) // 2]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / data.ARCHIVE_NAME).write_bytes(content)
    with pytest.raises(DataError, match=rf"{data.ARCHIVE_NAME} could not be extracted \(.+\); delete it and rerun"):
        data.fetch_cifar10(cache, url=refused_url, md5=hashlib.md5(content).hexdigest())
    assert cache_names(cache) == [data.ARCHIVE_NAME]


def test_md5_and_sha256_match_hashlib(folder):
    paths = [folder[0] / name for name in (data.META_FILE, *data.TRAIN_BATCHES, data.TEST_BATCH)]
    assert data._md5(paths[0]) == hashlib.md5(paths[0].read_bytes()).hexdigest()
    # The recorded source checksum is the sha256 of all the files' bytes in order: unchanged across versions.
    assert data._sha256_files(paths) == hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def test_data_module_imports_no_tensorflow_or_keras():
    code = "import sys, cifar_mlops.data; print(sorted({'keras', 'tensorflow', 'sklearn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"


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


def test_locate_downloads_the_canonical_archive_into_the_cache(tmp_path):
    # The network guard refuses the canonical URL: the error shows it was asked for, and where to put it.
    archive = tmp_path / "default-cache" / data.ARCHIVE_NAME  # $CIFAR_MLOPS_CACHE (isolated_env)
    url = re.escape(data.CIFAR10_URL)
    with pytest.raises(DataError, match=rf"^could not download {url} \(tests must not reach the network\); "
                                        rf"download {url} by hand and put it at {re.escape(str(archive))}, "):
        data.locate_cifar10(DataConfig())
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "given-cache" / data.ARCHIVE_NAME))):
        data.locate_cifar10(DataConfig(cache_dir=str(tmp_path / "given-cache")))


def test_locate_refuses_an_archive_that_is_not_the_canonical_one(tmp_path):
    archive = tmp_path / "default-cache" / data.ARCHIVE_NAME
    archive.parent.mkdir()
    archive.write_bytes(b"tampered")
    with pytest.raises(DataError, match=rf"is damaged or incomplete: md5 {hashlib.md5(b'tampered').hexdigest()}, "
                                        rf"expected {data.CIFAR10_MD5}; delete it"):
        data.locate_cifar10(DataConfig())
    assert archive.read_bytes() == b"tampered"


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
# The input pipeline (cifar_mlops.pipeline, on the backend the suite runs on) and class weights


def _epoch(batches) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the batches, as Keras makes it: every batch, then the end of the epoch."""
    images, labels = zip(*(batches[i] for i in range(len(batches))))
    batches.on_epoch_end()
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.core
def test_batches_shapes_and_order():
    from cifar_mlops.pipeline import Batches

    x, y, _, _ = data.synthetic_arrays(50, 10, seed=0)
    batches = Batches(x, y, batch_size=16, num_classes=10, training=False)
    images, labels = batches[0]
    assert len(batches) == 4 and batches[3][0].shape == (2, 32, 32, 3)
    assert images.dtype.name == "uint8" and tuple(images.shape) == (16, 32, 32, 3)
    assert labels.dtype.name == "float32" and tuple(labels.shape) == (16, 10)
    all_images, all_labels = _epoch(batches)
    np.testing.assert_array_equal(all_images, x)  # fixed order, untouched
    np.testing.assert_array_equal(all_labels.argmax(axis=1), y)
    assert set(all_labels.sum(axis=1)) == {1.0}
    with pytest.raises(IndexError):
        batches[4]


@pytest.mark.core
def test_batches_for_several_devices_split_evenly_and_leave_out_fewer_images_than_devices():
    from cifar_mlops.pipeline import Batches

    x, y, _, _ = data.synthetic_arrays(54, 10, seed=0)
    for training in (True, False):
        batches = Batches(x, y, batch_size=16, num_classes=10, training=training, multiple_of=4)
        assert [len(batches[i][0]) for i in range(len(batches))] == [16, 16, 16, 4]  # 54 -> 52 images
    assert len(Batches(x[:50], y[:50], batch_size=16, num_classes=10, training=True, multiple_of=4)) == 3


@pytest.mark.core
def test_training_reshuffles_each_epoch_and_augments():
    from cifar_mlops.pipeline import Batches

    # One class per image: the one-hot label tells which image a batch row came from.
    n = 48
    x, _, _, _ = data.synthetic_arrays(n, 10, seed=0)
    ids = np.arange(n)
    plain = Batches(x, ids, batch_size=16, num_classes=n, training=True, seed=1)
    (first, first_labels), (_, second_labels) = _epoch(plain), _epoch(plain)
    order, order2 = first_labels.argmax(axis=1), second_labels.argmax(axis=1)
    assert sorted(order) == list(ids) and not np.array_equal(order, order2)
    np.testing.assert_array_equal(first, x[order])

    augment = AugmentConfig(flip=True, rotation=20, translation=0.1, blur_sigma=1.5)
    augmented = Batches(x, ids, batch_size=16, num_classes=n, training=True, augment=augment, seed=1)
    images, labels = _epoch(augmented)
    assert images.dtype == np.uint8 and images.shape == x.shape
    changed = (images != x[labels.argmax(axis=1)]).reshape(n, -1).any(axis=1)
    assert changed.mean() > 0.9
    again, _ = _epoch(Batches(x, ids, batch_size=16, num_classes=n, training=True, augment=augment, seed=1))
    np.testing.assert_array_equal(images, again)  # same seed, same augmented epoch

    evaluation = Batches(x, ids, batch_size=16, num_classes=n, training=False, augment=augment)
    np.testing.assert_array_equal(_epoch(evaluation)[0], x)


@pytest.mark.core
def test_an_epochs_order_and_augmentation_depend_only_on_seed_and_epoch():
    from cifar_mlops.pipeline import Batches, EpochClock

    # what lets a resumed training see the batches the lost one would have seen
    n = 40
    x, _, _, _ = data.synthetic_arrays(n, 10, seed=0)
    ids = np.arange(n)
    augment = AugmentConfig(flip=True, rotation=20, translation=0.1, blur_sigma=1.5)
    passes = Batches(x, ids, batch_size=16, num_classes=n, training=True, augment=augment, seed=3)
    epochs = [_epoch(passes) for _ in range(3)]  # epochs 0, 1, 2
    fresh = Batches(x, ids, batch_size=16, num_classes=n, training=True, augment=augment, seed=3, clock=EpochClock(2))
    images, labels = fresh[2], fresh[0]  # in any order, and more than once
    np.testing.assert_array_equal(fresh[2][0], images[0])
    np.testing.assert_array_equal(labels[1].argmax(axis=1), data.epoch_order(n, 3, 2)[:16])
    np.testing.assert_array_equal(np.concatenate([fresh[i][0] for i in range(3)]), epochs[2][0])
    assert not np.array_equal(epochs[1][0], epochs[2][0])
    assert not np.array_equal(data.epoch_order(n, 4, 2), data.epoch_order(n, 3, 2))


@pytest.mark.core
def test_blur_smooths_images():
    from cifar_mlops.pipeline import Batches

    x, _, _, _ = data.synthetic_arrays(32, 10, seed=0)
    batches = Batches(x, np.zeros(32, int), batch_size=32, num_classes=10, training=True,
                      augment=AugmentConfig(blur_sigma=3.0))
    blurred = _epoch(batches)[0].astype(float)

    def roughness(images):
        return np.abs(np.diff(images.astype(float), axis=2)).mean()

    assert roughness(blurred) < 0.8 * roughness(x)
    assert abs(blurred.mean() - x.mean()) < 3  # blur keeps the brightness


@pytest.mark.core
def test_blur_of_a_flat_image_is_the_image_and_a_point_spreads_as_a_gaussian():
    from keras import ops

    from cifar_mlops.pipeline import gaussian_blur

    flat = np.full((2, 32, 32, 3), 100.0, np.float32)
    np.testing.assert_allclose(ops.convert_to_numpy(gaussian_blur(flat, np.array([0.5, 2.0], np.float32), 6)),
                               flat, rtol=1e-6)
    point = np.zeros((1, 32, 32, 1), np.float32)
    point[0, 16, 16, 0] = 1.0
    spread = ops.convert_to_numpy(gaussian_blur(point, np.array([1.0], np.float32), 3))[0, 16, :, 0]
    kernel = np.exp(-np.arange(-3, 4) ** 2 / 2)
    kernel /= kernel.sum()
    np.testing.assert_allclose(spread[13:20], kernel * kernel[3], rtol=1e-5)  # separable: row x centre of column


@pytest.mark.core
def test_cutout_greys_one_square_per_image_within_the_image():
    from keras import ops

    from cifar_mlops.pipeline import Batches, cutout

    images = np.zeros((3, 32, 32, 1), np.float32)
    where = np.array([[0.5, 0.5], [0.0, 0.0], [0.99, 0.2]], np.float32)  # centres (16, 16), (0, 0), (31, 6)
    out = ops.convert_to_numpy(cutout(images, 8, where))[..., 0]
    assert set(np.unique(out)) == {0.0, 128.0}
    np.testing.assert_array_equal(np.argwhere(out[0] == 128).min(axis=0), [12, 12])
    assert (out[0] == 128).sum() == 64
    assert (out[1] == 128).sum() == 16 and out[1, :4, :4].all()  # past the corner: a quarter stays
    assert (out[2] == 128).sum() == 5 * 8 and out[2, 27:, 2:10].all()  # rows 27-31, columns 2-9

    x, _, _, _ = data.synthetic_arrays(32, 10, seed=0)
    batches = Batches(x, np.zeros(32, int), batch_size=16, num_classes=10, training=True,
                      augment=AugmentConfig(cutout=12))
    first, again = _epoch(batches)[0], _epoch(Batches(x, np.zeros(32, int), batch_size=16, num_classes=10,
                                                      training=True, augment=AugmentConfig(cutout=12)))[0]
    np.testing.assert_array_equal(first, again)  # seeded like every other draw
    changed = (first != x[data.epoch_order(32, 0, 0)]).any(axis=3)
    assert 0 < changed.sum(axis=(1, 2)).min() and changed.sum(axis=(1, 2)).max() <= 144


def test_mixup_and_cutmix_mix_images_and_labels_by_what_each_image_keeps():
    from cifar_mlops.pipeline import cutmix, mixup

    images = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)])
    labels = np.eye(2, dtype=np.float32)
    mixed, mixed_labels = mixup(images, labels, np.array([0.25, 1.0]), np.array([1, 0]))
    assert mixed.dtype == np.uint8 and set(np.unique(mixed[0])) == {150} and set(np.unique(mixed[1])) == {200}
    np.testing.assert_allclose(mixed_labels, [[0.25, 0.75], [0.0, 1.0]])

    # w = 0.75: a box of half the side (16 x 16) from the partner; the second one's box is cut at the corner
    pasted, pasted_labels = cutmix(images, labels, np.array([0.75, 0.75]), np.array([1, 0]),
                                   np.array([[0.5, 0.5], [0.0, 0.0]]))
    assert np.argwhere(pasted[0, ..., 0] == 200).min(axis=0).tolist() == [8, 8] and (pasted[0] == 200).sum() == 16 * 16 * 3
    assert (pasted[1, ..., 0] == 0).sum() == 8 * 8 and (pasted[1, :8, :8] == 0).all()
    np.testing.assert_allclose(pasted_labels, [[0.75, 0.25], [1 / 16, 15 / 16]])


@pytest.mark.core
def test_mixed_batches_keep_labels_summing_to_one_and_repeat_with_the_seed():
    from cifar_mlops.pipeline import Batches

    x, y, _, _ = data.synthetic_arrays(64, 10, seed=0)
    for augment in (AugmentConfig(mixup=1.0), AugmentConfig(cutmix=1.0), AugmentConfig(flip=True, mixup=0.4, cutmix=0.4)):
        (images, labels), (again, again_labels) = (
            _epoch(Batches(x, y, batch_size=32, num_classes=10, training=True, augment=augment, seed=2)) for _ in range(2))
        np.testing.assert_array_equal(images, again)
        np.testing.assert_array_equal(labels, again_labels)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
        assert (labels.max(axis=1) < 1).mean() > 0.5, augment  # most images are mixed with another
    plain = _epoch(Batches(x, y, batch_size=32, num_classes=10, training=False, augment=AugmentConfig(mixup=1.0)))
    np.testing.assert_array_equal(plain[0], x)  # never at evaluation


def test_class_weights_balanced():
    y = np.array([0] * 10 + [1] * 30)
    assert data.class_weights(y, 3) == pytest.approx({0: 2.0, 1: 40 / 60, 2: 1.0})
    assert data.class_weights(np.arange(20) % 4, 4) == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})


# ---------------------------------------------------------------------------
# The real sample


@needs_sample
def test_real_sample():
    splits = data.load_splits(DataConfig(data_dir=str(SAMPLE_DIR), val_size=500))
    assert splits.source == "cifar10-partial"
    assert len(splits.y_train) + len(splits.y_val) == 4170 and len(splits.y_test) == 1000
    assert splits.class_names == data.CLASS_NAMES
    for labels in (splits.y_train, splits.y_val, splits.y_test):
        assert set(labels) == set(range(10))
    assert splits.x_train.dtype == np.uint8 and splits.x_train.shape[1:] == (32, 32, 3)
    assert 60 < splits.x_train.mean() < 200  # natural images, not noise or zeros
