"""The code of every registered model: images in, class names and probabilities out.

`train` logs this file as its model's code (MLflow "models from code") with one member, its
Keras model; `ensemble` logs it with several members and their weights. Both evaluate with the
functions below (`load_member`, `predict_in_batches`, `soft_vote`), so a served model predicts
exactly what was evaluated. Where it is served it needs only mlflow, numpy, pandas, Pillow and
its members' own flavour (Keras).

What a model takes, one input named `image` (its signature is an object tensor of shape (-1,),
the one form that MLflow's input checks let through both as a tensor and as a DataFrame column):
- raw pixels: uint8 (n, 32, 32, 3) RGB, e.g. `{"inputs": [[[[r, g, b], ...]]]}`;
- encoded images: (n,) PNG/JPEG/WebP/BMP/GIF files, as bytes or base64 strings (a `data:` URL
  prefix is allowed), e.g. `{"dataframe_split": {"columns": ["image"], "data": [["iVBOR..."]]}}`.
  They are decoded as `decode_image` says: EXIF orientation applied, greyscale and palette images
  made RGB, transparency composited onto white, the centre square kept and scaled to 32x32 by
  area averaging (bicubic where an image is smaller than 32 pixels).
What it gives: a table, one row per image: `label` (the class name), `probability` (its
probability) and one column per class with all the probabilities.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import PythonModel

IMAGE_SIZE = 32  # pixels: CIFAR-10's side
MAX_ENCODED_BYTES = 20 * 2**20  # one encoded image; a larger one is refused before it is decoded
MAX_PIXELS = 50_000_000  # one decoded image (width x height): a "decompression bomb" is refused
INPUT_NAME = "image"
LABEL, PROBABILITY = "label", "probability"


class BadRequest(MlflowException):
    """A request that cannot be answered: HTTP 400 with this message as it is written.

    MLflow's scoring server prefixes the message of an exception raised in `predict` with the
    whole request ("Failed to predict data '...'"), for images megabytes of pixels; this message
    keeps the first value it is given, so a client reads one line that names what is wrong.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=BAD_REQUEST)

    @property
    def message(self) -> str:
        return self._request_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_request_message"):
            self._request_message = value


class BadImage(Exception):
    """One encoded image that cannot be decoded; the message says why."""


def decode_image(encoded: bytes) -> np.ndarray:
    """An encoded image file as uint8 (32, 32, 3) RGB, the way a CIFAR-10 image looks; raise BadImage."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(encoded) > MAX_ENCODED_BYTES:
        raise BadImage(f"is {len(encoded) / 2**20:.1f} MiB; the limit is {MAX_ENCODED_BYTES / 2**20:.0f} MiB "
                       "per image (scale it down first)")
    if not encoded:
        raise BadImage("is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise BadImage(f"is {image.width}x{image.height} pixels; the limit is {MAX_PIXELS:,} pixels")
            image.draft("RGB", (IMAGE_SIZE * 4, IMAGE_SIZE * 4))  # JPEG: decode at a reduced scale, much faster
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image.alpha_composite(rgba)
            image = image.convert("RGB")
            smaller = min(image.size) < IMAGE_SIZE
            square = ImageOps.fit(image, (IMAGE_SIZE, IMAGE_SIZE),
                                  method=Image.Resampling.BICUBIC if smaller else Image.Resampling.BOX)
            return np.asarray(square, dtype=np.uint8)
    except UnidentifiedImageError:
        raise BadImage("is not an image Pillow can read (PNG, JPEG, WebP, BMP, GIF, ...)") from None
    except Image.DecompressionBombError:
        raise BadImage(f"has too many pixels; the limit is {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError) as err:  # a truncated or corrupt file
        raise BadImage(f"cannot be decoded ({str(err).strip() or type(err).__name__})") from None


def _encoded_bytes(value: object) -> bytes:
    if isinstance(value, np.ndarray) and value.ndim == 0:  # `instances` rows arrive as 0-d arrays
        value = value.item()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        if len(text) > MAX_ENCODED_BYTES * 4 // 3 + 4:
            raise BadImage(f"is over {MAX_ENCODED_BYTES / 2**20:.0f} MiB encoded; the limit is "
                           f"{MAX_ENCODED_BYTES / 2**20:.0f} MiB per image (scale it down first)")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage("is a string but not base64 (send each encoded image base64-encoded)") from None
    raise BadImage(f"is a {type(value).__name__}; expected a base64 string or bytes of an encoded image")


def to_pixels(model_input: object) -> np.ndarray:
    """The images of one request as uint8 (n, 32, 32, 3); raise BadRequest naming what is wrong."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_NAME not in model_input.columns:
            raise BadRequest(f"no column {INPUT_NAME!r} (columns: {list(model_input.columns)}); "
                             f"send the images in a column named {INPUT_NAME!r}")
        model_input = model_input[INPUT_NAME].to_numpy()
    if isinstance(model_input, dict):  # the signature names its one input "image"
        if set(model_input) != {INPUT_NAME}:
            raise BadRequest(f"inputs {sorted(model_input)}; send one input named {INPUT_NAME!r}")
        model_input = model_input[INPUT_NAME]
    values = np.asarray(model_input) if not isinstance(model_input, np.ndarray) else model_input
    if values.size == 0 or values.ndim == 0:
        raise BadRequest("the request holds no images; send at least one")
    if values.ndim == 1 and (values.dtype == object or values.dtype.kind in "SU"):
        pixels = np.empty((len(values), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for i, value in enumerate(values):
            try:
                pixels[i] = decode_image(_encoded_bytes(value))
            except BadImage as err:
                raise BadRequest(f"image {i} {err}") from None
        return pixels
    if values.dtype == object:  # nested JSON lists of pixel values
        try:
            values = np.array(values.tolist())
        except ValueError:
            raise BadRequest("the pixel arrays have different shapes; each image must be 32x32x3") from None
    expected = f"(n, {IMAGE_SIZE}, {IMAGE_SIZE}, 3)"
    if values.ndim != 4 or values.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise BadRequest(f"pixels of shape {values.shape}; send uint8 {expected} RGB pixels, "
                         "or encoded images (base64 PNG/JPEG) of any size")
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise BadRequest(f"pixels of type {values.dtype}" + (f" from {values.min()} to {values.max()}"
                         if values.dtype.kind in "iuf" else "") + "; send integers 0-255 (uint8)")
    return values.astype(np.uint8)


def normalized(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def soft_vote(probabilities: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of the members' class probabilities, (N, classes) float32."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])
    return np.tensordot(normalized(weights), stacked, axes=1).astype(np.float32)


def predict_in_batches(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                       batch_size: int) -> np.ndarray:
    """`predict(batch)` over `images`, `batch_size` at a time, as float32 (N, classes).

    Keras's per-call progress bar and its "structure of `inputs`" warning (a model with a
    named input fed a plain array) are held back meanwhile.
    """
    import keras

    keras.utils.disable_interactive_logging()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The structure of `inputs`")
            chunks = [np.asarray(predict(images[i:i + batch_size]), dtype=np.float32)
                      for i in range(0, len(images), batch_size)]
    finally:
        keras.utils.enable_interactive_logging()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def flip_averaged(predict: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """`predict` made to answer, for each image, the mean of its probabilities for the image and for its
    left-right mirror image (test-time flips: a model trained on flipped images sees both views)."""
    def predict_both_ways(images: np.ndarray) -> np.ndarray:
        mirrored = np.ascontiguousarray(images[:, :, ::-1])
        return (np.asarray(predict(images), np.float32) + np.asarray(predict(mirrored), np.float32)) / 2

    return predict_both_ways


def load_member(uri: str, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The model logged at `uri` as a function from uint8 (n, 32, 32, 3) images to (n, classes) probabilities."""
    import mlflow

    return probabilities_of(mlflow.pyfunc.load_model(uri), batch_size)


def probabilities_of(model, batch_size: int, test_time_flip: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """A loaded pyfunc as a function from uint8 (n, 32, 32, 3) images to (n, classes) float32 probabilities.

    A model logged from this file answers through its own `probabilities` (with its own test-time
    flips, if it has them); a plain Keras model (a member, or a version registered before models
    took encoded images) is called batch by batch with `predict_on_batch`, which is quiet and skips
    `model.predict`'s per-call set-up, each batch `flip_averaged` where `test_time_flip`; any other
    pyfunc that takes pixels and returns probabilities through its `predict`.
    """
    if "keras" in model.metadata.flavors:
        keras_model = model.get_raw_model()
        predict = flip_averaged(keras_model.predict_on_batch) if test_time_flip else keras_model.predict_on_batch
        return lambda images: predict_in_batches(predict, images, batch_size)
    try:
        python_model = model.unwrap_python_model()
    except MlflowException:  # not a PythonModel
        python_model = None
    if hasattr(python_model, "probabilities"):
        return python_model.probabilities
    return lambda images: predict_in_batches(model.predict, images, batch_size)


def predictions_table(probabilities: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per image: the most probable class's name and probability, then every class's probability."""
    best = probabilities.argmax(axis=1)
    table = pd.DataFrame({LABEL: np.asarray(class_names, dtype=object)[best],
                          PROBABILITY: probabilities[np.arange(len(best)), best]})
    return pd.concat([table, pd.DataFrame(probabilities, columns=list(class_names))], axis=1)


class ImageModel(PythonModel):
    """Images in (see the module), the members' weighted mean probabilities as a table out.

    Members are the models copied into this model's artifacts; weights, class names, batch size
    and whether a Keras member predicts with test-time flips (`test_time_flip`, absent in models
    logged before it existed) are in the model config.
    """

    _skip_type_hint_validation = True  # the signature is logged explicitly: no type-hint check or warning

    def load_context(self, context) -> None:
        import mlflow

        config = context.model_config["image_model"]
        self.weights = [float(w) for w in config["weights"]]
        self.class_names = list(config["class_names"])
        batch_size = int(config["batch_size"])
        test_time_flip = bool(config.get("test_time_flip", False))
        # The members as loaded pyfuncs (`.get_raw_model()` of a Keras one is the Keras model) ...
        self.member_models = [mlflow.pyfunc.load_model(context.artifacts[key]) for key in config["member_keys"]]
        # ... and as functions from images to probabilities.
        self.members = [probabilities_of(model, batch_size, test_time_flip) for model in self.member_models]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, 32, 32, 3) images -> (n, classes) float32 probabilities."""
        return soft_vote([member(images) for member in self.members], self.weights)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return predictions_table(self.probabilities(to_pixels(model_input)), self.class_names)


set_model(ImageModel())  # what MLflow loads when it runs this file as a model's code
