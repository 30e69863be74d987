"""Registered models at work: `mlflow models serve` answers pixels and encoded images of any size with
class names and probabilities, refuses bad requests with a 400 and keeps serving, and `cifar-mlops
predict` runs the same code over image files and folders."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from cifar_mlops import cli, data, ensemble
from cifar_mlops.tracking import image_model, served
from tests.conftest import serving, skip_or_fail, tiny_ensemble

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("serve")

BIN = Path(sys.executable).parent
CLASSES = list(data.SYNTHETIC_CLASS_NAMES)
CNN, ENSEMBLE = "models:/cifar10-cnn/1", "models:/cifar10-ensemble/1"


@pytest.fixture(scope="module")
def registry(trained_registry: str) -> str:
    """The shared trained registry (cifar10-cnn versions 1-3, conftest.TRAINED_REGISTRY) and cifar10-ensemble
    version 1 of its newest `smoke` and `smoke-wide`."""
    ensemble.build(tiny_ensemble(fit_weights=False))
    return trained_registry


@pytest.fixture(scope="module")
def cnn_url(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(CNN, registry, tmp_path_factory.mktemp("serve-log") / "cnn.log") as url:
        yield url


def invoke(url: str, body: dict | str) -> requests.Response:
    payload = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=payload, headers={"Content-Type": "application/json"},
                         timeout=120)


def answered(response: requests.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text[:2000]
    return pd.DataFrame(response.json()["predictions"])


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth random colours (a JPEG of noise would be mostly artefacts)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).convert(mode)


def in_process(model_uri: str, pixels: np.ndarray) -> pd.DataFrame:
    return served.load_model(model_uri).predict(pixels)


def assert_same_answers(served_table: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(served_table.columns) == ["label", "probability", *CLASSES]
    assert list(served_table["label"]) == list(expected["label"])
    np.testing.assert_allclose(served_table[["probability", *CLASSES]].to_numpy(np.float64),
                               expected[["probability", *CLASSES]].to_numpy(np.float64), rtol=0, atol=1e-6)
    np.testing.assert_allclose(served_table[CLASSES].sum(axis=1), 1.0, atol=1e-5)


def test_served_model_answers_pixel_tensors_like_the_loaded_model(cnn_url: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = in_process(CNN, pixels)
    assert_same_answers(answered(invoke(cnn_url, {"inputs": pixels.tolist()})), expected)
    assert_same_answers(answered(invoke(cnn_url, {"inputs": {"image": pixels.tolist()}})), expected)


def test_a_version_trained_on_one_backend_is_served_on_jax_with_the_same_answers(registry: str, tmp_path) -> None:
    # what a GPU machine without TensorFlow does with a version trained here: the same model, another backend
    if importlib.util.find_spec("jax") is None:
        skip_or_fail("JAX is not installed (the `test` extra installs it)")
    pixels = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    expected = in_process(CNN, pixels)  # on the suite's backend: TensorFlow, unless $KERAS_BACKEND says otherwise
    with serving(CNN, registry, tmp_path / "jax.log", KERAS_BACKEND="jax") as url:
        table = answered(invoke(url, {"inputs": pixels.tolist()}))
    assert list(table["label"]) == list(expected["label"])
    np.testing.assert_allclose(table[CLASSES].to_numpy(np.float64), expected[CLASSES].to_numpy(np.float64),
                               rtol=0, atol=1e-4)


def test_served_model_decodes_png_and_jpeg_of_any_size_like_the_loaded_model(cnn_url: str) -> None:
    files = [encoded(random_image(70, 50, seed=1), "PNG"), encoded(random_image(300, 200, seed=2), "JPEG", quality=90),
             encoded(random_image(40, 40, "L", seed=3), "PNG"), encoded(random_image(20, 24, "RGBA", seed=4), "PNG")]
    pixels = np.stack([image_model.decode_image(f) for f in files])
    strings = [base64.b64encode(f).decode() for f in files]
    strings[1] = f"data:image/jpeg;base64,{strings[1]}"  # a data URL, as a browser makes it
    table = answered(invoke(cnn_url, {"dataframe_split": {"columns": ["image"], "data": [[s] for s in strings]}}))
    assert_same_answers(table, in_process(CNN, pixels))
    records = answered(invoke(cnn_url, {"dataframe_records": [{"image": s} for s in strings]}))
    assert_same_answers(records, table)


TEXT = base64.b64encode(b"not an image at all").decode()
BAD_REQUESTS = {
    "wrong shape": ({"inputs": np.zeros((2, 31, 32, 3), int).tolist()}, "pixels of shape (2, 31, 32, 3)"),
    "one image without its batch axis": ({"inputs": np.zeros((32, 32, 3), int).tolist()}, "(n, 32, 32, 3)"),
    "floats": ({"inputs": np.full((1, 32, 32, 3), 0.5).tolist()}, "pixels of type float64"),
    "out of range": ({"inputs": np.full((1, 32, 32, 3), 300).tolist()}, "from 300 to 300; send integers 0-255"),
    "bytes that are not an image": ({"dataframe_split": {"columns": ["image"], "data": [[TEXT]]}},
                                    "image 0 is not an image"),
    "not base64": ({"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}}, "image 0 is a string but not base64"),
    "an empty batch": ({"inputs": []}, "the request holds no images"),
}
# Refused by MLflow's own checks before the model sees them: still a 400 that says what is wrong.
REFUSED_BY_MLFLOW = {
    "no image column": ({"dataframe_split": {"columns": ["photo"], "data": [[TEXT]]}},
                        "Model is missing inputs ['image']"),
    "not JSON": ("{not json", "Invalid input"),
}


@pytest.mark.parametrize("case", [*BAD_REQUESTS, *REFUSED_BY_MLFLOW])
def test_bad_request_gets_one_clear_400_and_the_server_keeps_serving(cnn_url: str, case: str) -> None:
    body, says = BAD_REQUESTS.get(case) or REFUSED_BY_MLFLOW[case]
    response = invoke(cnn_url, body)
    assert response.status_code == 400, response.text[:500]
    message = response.json()["message"]
    assert says in message, message
    if case in BAD_REQUESTS:  # the model's own checks: one short line, no echo of the request
        assert "\n" not in message and len(message) < 300, message
    good = np.zeros((1, 32, 32, 3), np.uint8)
    assert answered(invoke(cnn_url, {"inputs": good.tolist()}))["label"].size == 1


def test_a_50_mb_image_is_refused_before_it_is_decoded(cnn_url: str) -> None:
    huge = base64.b64encode(os.urandom(50 * 2**20)).decode()
    started = time.monotonic()
    response = invoke(cnn_url, {"dataframe_split": {"columns": ["image"], "data": [[huge]]}})
    assert response.status_code == 400
    assert response.json()["message"] == ("image 0 is over 20 MiB encoded; the limit is 20 MiB per image "
                                          "(scale it down first)")
    assert len(response.content) < 1000 and time.monotonic() - started < 60
    assert answered(invoke(cnn_url, {"inputs": np.zeros((1, 32, 32, 3), np.uint8).tolist()}))["label"].size == 1


def test_served_ensemble_answers_like_the_loaded_ensemble(registry: str, tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    png = base64.b64encode(encoded(random_image(64, 48, seed=5), "PNG")).decode()
    with serving(ENSEMBLE, registry, tmp_path / "ensemble.log") as url:
        assert_same_answers(answered(invoke(url, {"inputs": pixels.tolist()})), in_process(ENSEMBLE, pixels))
        table = answered(invoke(url, {"dataframe_split": {"columns": ["image"], "data": [[png]]}}))
    decoded = image_model.decode_image(base64.b64decode(png))[None]
    assert_same_answers(table, in_process(ENSEMBLE, decoded))
    members = [served.load_probabilities(f"models:/cifar10-cnn/{v}", 16)(decoded) for v in (2, 3)]  # smoke, smoke-wide
    np.testing.assert_allclose(table[CLASSES].to_numpy(), np.mean(members, axis=0), atol=1e-6)


# ---------------------------------------------------------------------------
# Decoding: how a photo becomes a CIFAR-sized image


def test_a_32x32_png_decodes_to_exactly_its_pixels() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(image_model.decode_image(encoded(Image.fromarray(pixels), "PNG")), pixels)


def test_downscaling_averages_areas_and_keeps_the_centre_square() -> None:
    blocks = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    large = blocks.repeat(3, axis=0).repeat(3, axis=1)  # 96x96: each pixel a 3x3 block
    np.testing.assert_array_equal(image_model.decode_image(encoded(Image.fromarray(large), "PNG")), blocks)
    wide = np.concatenate([np.zeros((96, 32, 3), np.uint8), large, np.full((96, 32, 3), 255, np.uint8)], axis=1)
    np.testing.assert_array_equal(image_model.decode_image(encoded(Image.fromarray(wide), "PNG")), blocks)


def test_greyscale_becomes_rgb_and_transparency_becomes_white() -> None:
    grey = image_model.decode_image(encoded(random_image(40, 40, "L"), "PNG"))
    assert grey.shape == (32, 32, 3) and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    np.testing.assert_array_equal(image_model.decode_image(encoded(clear, "PNG")), 255)
    half = Image.new("LA", (32, 32), (0, 128))
    assert abs(int(image_model.decode_image(encoded(half, "PNG"))[0, 0, 0]) - 127) <= 1


@pytest.mark.parametrize("case", ["truncated", "text", "empty", "too many pixels", "too large"])
def test_undecodable_images_are_refused_with_the_reason(case: str) -> None:
    jpeg = encoded(random_image(200, 200), "JPEG")
    bad, says = {
        "truncated": (jpeg[: len(jpeg) // 2], "cannot be decoded (image file is truncated"),
        "text": (b"hello", "is not an image Pillow can read"),
        "empty": (b"", "is empty"),
        "too many pixels": (encoded(Image.new("1", (8000, 7000)), "PNG"), "is 8000x7000 pixels; the limit"),
        "too large": (b"\0" * (image_model.MAX_ENCODED_BYTES + 1), "is 20.0 MiB; the limit is 20 MiB"),
    }[case]
    with pytest.raises(image_model.BadImage, match=None) as refused:
        image_model.decode_image(bad)
    assert str(refused.value).startswith(says), str(refused.value)


# ---------------------------------------------------------------------------
# `cifar-mlops predict` over files and folders


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A PNG, a JPEG, a greyscale PNG, a text file and a truncated JPEG (in a subfolder), plus a hidden file."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    random_image(50, 70, seed=6).save(folder / "a.png")
    random_image(300, 200, seed=7).save(folder / "b.jpg", quality=90)
    random_image(40, 40, "L", seed=8).save(folder / "more" / "grey.png")
    (folder / "notes.txt").write_text("not an image")
    jpeg = encoded(random_image(120, 90, seed=9), "JPEG")
    (folder / "more" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / ".DS_Store").write_bytes(b"\0\0")
    return folder


def predict_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


def test_predict_writes_one_row_per_file_and_reports_unreadable_ones(registry: str, photos: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(photos.parent)
    code, _, stderr = predict_cli("--model", CNN, "photos", "--out", "predictions.csv", "--batch-size", "2")
    assert code == 0, stderr
    assert "3 of 5 files predicted into predictions.csv; 2 could not be read or decoded" in stderr
    assert "predicted 4 / 5 files" in stderr  # progress, batch by batch
    table = pd.read_csv(photos.parent / "predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "label", "probability", *CLASSES, "error"]
    assert list(table["path"]) == ["photos/a.png", "photos/b.jpg", "photos/more/cut.jpg", "photos/more/grey.png",
                                   "photos/notes.txt"]
    errors = dict(zip(table["path"], table["error"]))
    assert errors["photos/more/cut.jpg"].startswith("the file cannot be decoded (image file is truncated")
    assert errors["photos/notes.txt"].startswith("the file is not an image")
    good = table[table["error"] == ""]
    assert len(good) == 3 and (table.loc[table["error"] != "", "label"] == "").all()
    pixels = np.stack([image_model.decode_image((photos.parent / p).read_bytes()) for p in good["path"]])
    expected = in_process(CNN, pixels)
    assert list(good["label"]) == list(expected["label"])
    np.testing.assert_allclose(good[CLASSES].to_numpy(float), expected[CLASSES].to_numpy(float), atol=1e-6)


def test_predict_top_k_and_json_lines(registry: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "top.jsonl"
    code, _, stderr = predict_cli("--model", "models:/cifar10-ensemble/1", str(photos / "a.png"),
                                  str(photos / "more"), "--top-k", "3", "--out", str(out))
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "cut.jpg", "grey.png"]
    assert set(rows[0]) == {"path", "label", "probability", "label_2", "probability_2", "label_3", "probability_3",
                            "error"}
    first = rows[0]
    assert first["probability"] >= first["probability_2"] >= first["probability_3"] > 0
    assert len({first["label"], first["label_2"], first["label_3"]}) == 3
    assert rows[1]["label"] is None and rows[1]["error"]


def test_predict_to_stdout_on_an_old_plain_keras_version(registry: str, photos: Path) -> None:
    """Versions registered before models took encoded images (the Keras flavour itself) still predict."""
    keras_model = served.load_model(CNN).unwrap_python_model().member_models[0].get_raw_model()
    with mlflow.start_run(run_name="plain keras"):
        info = mlflow.keras.log_model(keras_model, name="model", signature=served.pixel_signature(10),
                                      pip_requirements=["keras"])
    version = mlflow.register_model(info.model_uri, "cifar10-legacy").version
    code, stdout, stderr = predict_cli("--model", f"models:/cifar10-legacy/{version}", str(photos / "a.png"))
    assert code == 0, stderr
    table = pd.read_csv(io.StringIO(stdout), keep_default_na=False)
    assert list(table.columns) == ["path", "label", "probability", *(f"class_{i}" for i in range(10)), "error"]
    pixels = image_model.decode_image((photos / "a.png").read_bytes())[None]
    np.testing.assert_allclose(table[[f"class_{i}" for i in range(10)]].to_numpy(float),
                               in_process(CNN, pixels)[CLASSES].to_numpy(float), atol=1e-6)


@pytest.mark.parametrize("args, says", [
    (["--model", CNN, "nowhere"], "error: nowhere: no such file or folder"),
    (["--model", "models:/cifar10-cnn@nobody", "PHOTOS"], "error: cannot load model 'models:/cifar10-cnn@nobody': "),
    (["--model", CNN, "PHOTOS", "--out", "predictions.txt"], "error: --out predictions.txt: name a .csv or .jsonl file"),
    (["--model", CNN, "PHOTOS", "--top-k", "11"], "error: --top-k 11 is more than the model's 10 classes"),
])
def test_predict_bad_input_is_one_line_and_writes_nothing(registry: str, photos: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, args, says) -> None:
    monkeypatch.chdir(tmp_path)
    args = [str(photos) if a == "PHOTOS" else a for a in args]
    code, _, stderr = predict_cli(*args, *([] if "--out" in args else ["--out", "out.csv"]))
    assert code == 2, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(says) and "Traceback" not in stderr
    assert not (tmp_path / "out.csv").exists() and not list(tmp_path.glob(".out.csv.*"))


def test_loaded_model_predicts_quietly_in_a_fresh_process(registry: str, tmp_path: Path) -> None:
    code = ("import sys, numpy as np, mlflow\n"
            f"m = mlflow.pyfunc.load_model('{ENSEMBLE}')\n"
            "print('BEGIN', flush=True); print('BEGIN', file=sys.stderr, flush=True)\n"
            "t = m.predict(np.zeros((3, 32, 32, 3), np.uint8))\n"
            "print(list(t['label']))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=registry, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after_load = done.stdout.split("BEGIN", 1)[1]
    assert after_load.strip().startswith("['synthetic_"), after_load
    for noise in ("structure of `inputs`", "━", "step", "Warning"):
        assert noise not in after_load and noise not in done.stderr.split("BEGIN", 1)[1], (noise, done.stderr[-2000:])
    assert MlflowClient(registry).get_model_version("cifar10-ensemble", "1")
