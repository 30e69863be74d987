"""The input pipeline on every Keras backend: a `keras.utils.PyDataset` of uint8 batches.

Images stay uint8 (N, 32, 32, 3) in the caller's NumPy arrays; each batch is gathered from them
by index, so no framework copy of the whole set is ever made, and models resize it themselves.
Keras's own adapter turns the batches into what the backend trains on (tf.data on TensorFlow,
arrays placed on the device on JAX, a DataLoader on PyTorch). Augmentation runs on the batch as
Keras layers and `keras.ops`, on the backend's default device: TensorFlow is imported only when
it is the backend.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from cifar_mlops.config import AugmentConfig
from cifar_mlops.data import epoch_order


class EpochClock:
    """Which epoch the training batches are of.

    The order of epoch e, and every random draw of its augmentation, is a pure function of
    (seed, e): a training resumed at epoch e sees exactly the batches it would have seen.
    `fit` sets `epoch` at the start of each epoch (`train.follow_epochs`); a pass over the
    batches that `fit` does not drive moves it on by one at its end.
    """

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch


class Batches(keras.utils.PyDataset):
    """(uint8 images (B, 32, 32, 3), one-hot float32 labels (B, num_classes)) per batch.

    training=True: epoch e visits the images in the order `epoch_order(n, seed, e)`, each batch
    augmented with draws seeded by (seed, e, batch); `clock` says which epoch it is.
    training=False: fixed order, unchanged images.
    `multiple_of`: every batch's size is a multiple of it (the devices of a data-parallel training).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, num_classes: int, training: bool,
                 augment: AugmentConfig | None = None, seed: int = 0, clock: EpochClock | None = None,
                 multiple_of: int = 1) -> None:
        # One worker, no enqueuer: a batch is always made after `fit` has said which epoch it is of.
        super().__init__(workers=1, use_multiprocessing=False)
        self.images = np.ascontiguousarray(x, dtype=np.uint8)
        self.labels = np.eye(num_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]
        self.batch_size = batch_size
        # data-parallel training splits every batch evenly between its devices: the last batch leaves out the
        # few images (fewer than `multiple_of`) that would not split; an epoch's order changes which
        self.multiple_of = multiple_of
        self.training = training
        self.seed = seed
        self.clock = clock if clock is not None else EpochClock()
        self.augmenter = Augmenter(augment, seed) if training and augment is not None else None
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order): made once per epoch

    @property
    def num_batches(self) -> int:
        return math.ceil(self._usable() / self.batch_size)

    def _usable(self) -> int:
        n = len(self.images)
        last = n % self.batch_size
        return n - last % self.multiple_of

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of {self.num_batches}")
        rows = slice(index * self.batch_size, min((index + 1) * self.batch_size, self._usable()))
        if not self.training:
            return self.images[rows], self.labels[rows]
        epoch = self.clock.epoch
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.images), self.seed, epoch))
        idx = self._order[1][rows]
        images, labels = self.images[idx], self.labels[idx]
        if self.augmenter is not None:
            images = self.augmenter(images, epoch, index)
            images, labels = self.augmenter.mix(images, labels, epoch, index)
        return images, labels

    def on_epoch_end(self) -> None:
        if self.training:
            self.clock.epoch += 1


class Augmenter:
    """(uint8 batch, epoch, batch number) -> the augmented uint8 batch.

    Every random draw comes from a generator whose state is set from (seed, epoch, batch number)
    before the batch: the same batch of the same epoch is augmented the same way in any process.
    """

    def __init__(self, augment: AugmentConfig, seed: int) -> None:
        layers = []
        if augment.flip:
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
        if augment.rotation:
            layers.append(keras.layers.RandomRotation(augment.rotation / 360, seed=seed + 1))
        if augment.translation:
            layers.append(keras.layers.RandomTranslation(augment.translation, augment.translation, seed=seed + 2))
        self.layers = layers
        self.blur = augment.blur_sigma
        # keras.layers.RandomGaussianBlur (keras 3.15) caps sigma at 1 and draws one sigma per batch: own blur instead.
        self.sigma_seed = keras.random.SeedGenerator(seed + 3) if self.blur else None
        # Not keras.layers.CutMix/RandomErasing/MixUp: seeded like the layers above they repeat too, but their boxes stay
        # inside the image and CutMix weighs labels by box area, not pixels kept (tests pin the papers' versions); Keras's
        # MixUp matches ours but draws other numbers, so every seeded MixUp run would change.
        self.cutout = augment.cutout
        self.mixup, self.cutmix = augment.mixup, augment.cutmix
        self.cutout_seed = keras.random.SeedGenerator(seed + 4) if self.cutout else None
        self.generators = [layer.generator for layer in layers] + [g for g in (self.sigma_seed, self.cutout_seed) if g]
        self.seed = seed
        self._draw = self._apply
        if keras.backend.backend() == "tensorflow":  # a graph: a quarter of eager TensorFlow's time per batch
            import tensorflow as tf

            self._draw = tf.function(self._apply, reduce_retracing=True)

    def __call__(self, images: np.ndarray, epoch: int, step: int) -> np.ndarray:
        if not self.generators:  # no draw on the backend (MixUp and CutMix draw in NumPy: `mix`)
            return images
        # one stream per draw, keyed by (seed, draw, epoch, batch); wrapped to the generators' dtype (uint32)
        states = np.array([[(self.seed % 2**32) * 8 + k, epoch * 2**24 + step] for k in range(len(self.generators))],
                          dtype=np.int64).astype(self.generators[0].state.dtype)
        return ops.convert_to_numpy(self._draw(images, states))

    def mix(self, images: np.ndarray, labels: np.ndarray, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """MixUp and CutMix (where set) of a uint8 batch and its one-hot labels, with another image of the batch
        each, drawn from (seed, epoch, batch number) like every other draw."""
        if not (self.mixup or self.cutmix):
            return images, labels
        rng = np.random.default_rng([self.seed % 2**32, epoch, step])
        if self.mixup:
            images, labels = mixup(images, labels, rng.beta(self.mixup, self.mixup, len(images)),
                                   rng.permutation(len(images)))
        if self.cutmix:
            images, labels = cutmix(images, labels, rng.beta(self.cutmix, self.cutmix, len(images)),
                                    rng.permutation(len(images)), rng.random((len(images), 2)))
        return images, labels

    def _apply(self, images, states):
        for k, generator in enumerate(self.generators):  # indexed: a graph cannot iterate a tensor
            generator.state.assign(states[k])
        z = ops.cast(images, "float32")
        for layer in self.layers:
            z = layer(z, training=True)
        if self.blur:
            sigmas = keras.random.uniform((ops.shape(z)[0],), 0.0, self.blur, seed=self.sigma_seed)
            z = gaussian_blur(z, sigmas, radius=math.ceil(3 * self.blur))
        if self.cutout:
            z = cutout(z, self.cutout, keras.random.uniform((ops.shape(z)[0], 2), seed=self.cutout_seed))
        return ops.cast(ops.clip(ops.round(z), 0, 255), "uint8")


def mixup(images: np.ndarray, labels: np.ndarray, weights: np.ndarray, partners: np.ndarray):
    """uint8 images and their labels, each blended with `partners`' (indices into the batch): weight w of its own
    image and label, 1 - w of its partner's (Zhang et al.'s MixUp)."""
    w = weights.astype(np.float32)
    blended = w[:, None, None, None] * images + (1 - w[:, None, None, None]) * images[partners]
    return np.round(blended).astype(np.uint8), w[:, None] * labels + (1 - w[:, None]) * labels[partners]


def cutmix(images: np.ndarray, labels: np.ndarray, weights: np.ndarray, partners: np.ndarray, where: np.ndarray):
    """uint8 images and their labels, each with a box of its partner's image pasted over it (Yun et al.'s CutMix):
    the box's sides are sqrt(1 - w) of the image's, centred where `where` (uniform in [0, 1), row and column)
    points, cut at the border; the labels are weighted by the area each image keeps."""
    n, height, width = images.shape[:3]
    side = np.sqrt(1 - weights)
    rows, cols = np.arange(height)[None, :], np.arange(width)[None, :]
    top, left = (np.floor(where[:, k] * size) - np.floor(side * size / 2) for k, size in ((0, height), (1, width)))
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + np.round(side * height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + np.round(side * width)[:, None])
    box = in_rows[:, :, None] & in_cols[:, None, :]  # (n, height, width)
    pasted = np.where(box[..., None], images[partners], images)
    kept = 1 - box.reshape(n, -1).mean(axis=1, dtype=np.float32)
    return pasted, kept[:, None] * labels + (1 - kept[:, None]) * labels[partners]


def cutout(images, side: int, where):
    """Float (B, H, W, C) images, each with a side x side square set to mid-grey (128): its centre at the
    pixel that `where` (B, 2), uniform in [0, 1) per row and column, points to; the square may reach past the
    border (DeVries & Taylor's Cutout)."""
    height, width = images.shape[1], images.shape[2]
    top = ops.floor(where[:, 0] * height)[:, None, None] - side // 2
    left = ops.floor(where[:, 1] * width)[:, None, None] - side // 2
    rows = ops.arange(height, dtype="float32")[None, :, None]
    cols = ops.arange(width, dtype="float32")[None, None, :]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return ops.where(inside[..., None], 128.0, images)


def gaussian_blur(images, sigmas, radius: int):
    """Separable gaussian blur of float (B, H, W, C) images, one sigma (px) per image, reflect padding."""
    radius = min(radius, 15)  # reflect padding must stay within the 32 px side
    offsets = ops.arange(-radius, radius + 1, dtype="float32")
    sigmas = ops.maximum(sigmas, 1e-3)[:, None]
    weights = ops.exp(-ops.square(offsets)[None, :] / (2 * ops.square(sigmas)))
    weights = weights / ops.sum(weights, axis=1, keepdims=True)  # (B, 2r+1)
    for axis in (1, 2):
        pad = [[0, 0], [0, 0], [0, 0], [0, 0]]
        pad[axis] = [radius, radius]
        padded = ops.pad(images, pad, mode="reflect")
        size = images.shape[axis]
        total = ops.zeros_like(images)
        for k in range(2 * radius + 1):
            window = padded[:, k : k + size] if axis == 1 else padded[:, :, k : k + size]
            total = total + weights[:, k][:, None, None, None] * window
        images = total
    return images
