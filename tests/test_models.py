"""The model registry and every registered factory, built tiny."""

from __future__ import annotations

import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from cifar_mlops.config import ModelConfig
from cifar_mlops.models import ModelSettingError, UnknownModel, applications, create_model, get_model_entry, list_models
from cifar_mlops.models.applications import WeightsUnavailable

APPLICATIONS = ("mobilenetv2", "densenet121")
TINY = {"mobilenetv2": {"width": 0.25}, "densenet121": {"blocks": (1, 1, 1, 1)}}  # CNNs: width 0.25
MOBILENET_NOTOP_224 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"



def tiny(name: str, **settings):
    """The model `name`, shrunk (plain keyword arguments, as every factory takes them)."""
    return create_model(name, **{**TINY.get(name, {"width": 0.25}), **settings})


def images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def assert_probabilities(model: keras.Model, batch: np.ndarray, num_classes: int = 10) -> None:
    probs = model.predict(batch, verbose=0)
    assert probs.shape == (len(batch), num_classes) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()


@pytest.mark.core
@pytest.mark.parametrize("name", list_models())
def test_every_model_maps_raw_uint8_images_to_probabilities(name):
    model = tiny(name, num_classes=10)
    assert not model.compiled, "factories build, train.py compiles"
    (inp,) = model.inputs
    assert inp.dtype == "uint8" and tuple(inp.shape) == (None, 32, 32, 3) and inp.name == "image"
    assert model.layers[-1].name == "probabilities"
    assert model.output.dtype == "float32" and tuple(model.output.shape) == (None, 10)
    assert get_model_entry(name).description, "the first docstring line is the catalogue's description"
    assert_probabilities(model, images())


def test_mobilenetv2_resizes_inside_the_model():
    model = tiny("mobilenetv2", image_size=64, interpolation="bicubic", num_classes=10)
    resize = model.get_layer("resize")
    assert resize.interpolation == "bicubic" and tuple(resize.output.shape) == (None, 64, 64, 3)
    assert model.get_layer("backbone").input_shape == (None, 64, 64, 3)
    assert_probabilities(model, images(2))


@pytest.mark.parametrize("name", list_models())
def test_only_applications_have_a_backbone(name):
    model = tiny(name, num_classes=3)
    if name in APPLICATIONS:
        backbone = model.get_layer("backbone")
        assert isinstance(backbone, keras.Model) and backbone.trainable_weights
    else:
        with pytest.raises(ValueError):
            model.get_layer("backbone")


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(UnknownModel, match="known models: .*cnn_b5.*mobilenetv2"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        ModelConfig(name="resnet50")


def test_list_models_filters_names_with_a_shell_pattern():
    everything = list_models()
    assert list_models("*") == everything == sorted(everything) and len(everything) >= 10
    assert list_models("cnn_b[0-5]") == [f"cnn_b{i}" for i in range(6)]
    assert list_models("*net*") == ["densenet121", "mobilenetv2"]
    assert list_models("CNN_*") == [] and list_models("resnet*") == []  # case-sensitive; no match is an empty list
    assert {get_model_entry(name).family for name in list_models("cnn_*")} == {"cnn"}


def test_listing_the_registry_imports_neither_tensorflow_nor_the_config():
    # models/ knows nothing of experiment files: the dependency runs config -> models only
    code = ("import sys, cifar_mlops.models as m; m.list_models(); "
            "print(sorted({'keras', 'tensorflow', 'cifar_mlops.config'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", list_models())
def test_factory_defaults_are_the_config_defaults(name):
    # ModelConfig.settings() leaves defaults out, so a factory's own default must mean the same
    for setting, default in get_model_entry(name).settings.items():
        assert default == ModelConfig.model_fields[setting].default, (name, setting)


@pytest.mark.parametrize(
    "config, knob",
    [
        (dict(name="mobilenetv2", width=0.25, blocks=(1, 1, 1, 1)), "model.blocks"),
        (dict(name="densenet121", blocks=(1, 1, 1, 1), width=0.5), "model.width"),
        (dict(name="cnn_b0", blocks=(1, 1, 1, 1)), "model.blocks"),
        (dict(name="cnn_b5", weights="imagenet"), "model.weights"),
        (dict(name="mobilenetv2", width=0.25, weights="imagenet"), "model.width"),
        (dict(name="densenet121", blocks=(1, 1, 1, 1), weights="imagenet"), "model.blocks"),
    ],
)
def test_settings_a_model_cannot_honour_are_rejected(config, knob):
    with pytest.raises(ModelSettingError, match=knob):
        create_model(**config)


# ---------------------------------------------------------------------------
# Pretrained weights (no network: ImageNet files are generated stand-ins)


def save_notop_weights(path, width: float = 0.35) -> list[np.ndarray]:
    """Write a MobileNetV2 no-top weights file in the format of `path`'s suffix; return its weights."""
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=width, include_top=False, pooling="avg", weights=None
    )
    if str(path).endswith(".weights.h5"):
        backbone.save_weights(path)
    else:  # the legacy Keras .h5 layout of the published keras-applications files
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    return backbone.get_weights()


def assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("suffix", [".h5", ".weights.h5"])
def test_weights_file_is_loaded_into_the_backbone(tmp_path, suffix):
    path = tmp_path / f"notop{suffix}"
    saved = save_notop_weights(path)
    model = create_model("mobilenetv2", width=0.35, weights=str(path))
    assert_same_weights(model.get_layer("backbone").get_weights(), saved)
    fresh = create_model("mobilenetv2", width=0.35).get_layer("backbone")
    assert not np.array_equal(fresh.get_weights()[0], saved[0]), "random init must differ from the file"


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailable, match="model.weights file not found: .*nowhere.h5"):
        create_model("mobilenetv2", width=0.35, weights=str(tmp_path / "nowhere.h5"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Keras cache at tmp_path/keras, and the weights URL pointing at a closed local port
    (so keras.utils.get_file really fails to download, even on a machine with internet)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(applications, "KERAS_APPLICATIONS_URL", "http://127.0.0.1:9/keras-applications/")
    return tmp_path / "keras" / "models"


def test_imagenet_file_in_the_keras_cache_is_used_without_download(offline):
    offline.mkdir(parents=True)
    saved = save_notop_weights(offline / MOBILENET_NOTOP_224)  # the name Keras uses for alpha 0.35, 32 px -> 224's
    model = create_model("mobilenetv2", width=0.35, weights="imagenet")
    assert_same_weights(model.get_layer("backbone").get_weights(), saved)


def test_imagenet_offline_without_the_file_says_what_to_put_where(offline):
    with pytest.raises(WeightsUnavailable) as err:
        create_model("mobilenetv2", width=0.35, weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert str(offline / MOBILENET_NOTOP_224) in message and "--set model.weights=" in message
    assert not offline.joinpath(MOBILENET_NOTOP_224).exists()


def test_densenet_imagenet_file_is_hash_checked_not_deleted(offline):
    # keras.applications checks DenseNet files by md5, so a generated stand-in cannot pass: the
    # check is what is testable. (MobileNetV2 files have no published hash.)
    offline.mkdir(parents=True)
    stand_in = offline / applications.DENSENET121_NOTOP
    stand_in.write_bytes(b"not the real file")
    with pytest.raises(WeightsUnavailable, match=f"md5 differs from {applications.DENSENET121_NOTOP_MD5}"):
        create_model("densenet121", weights="imagenet")
    assert stand_in.exists()


def test_the_whitening_layer_is_set_from_training_patches_and_whitens_them():
    from cifar_mlops.models import cnn, init_from_data

    rng = np.random.default_rng(0)
    # neighbouring pixels and channels correlated, as in photographs: 4x4 blocks of one colour, plus noise
    blocks = np.repeat(np.repeat(rng.integers(0, 200, (300, 8, 8, 1)), 4, axis=1), 4, axis=2)
    images = (blocks + rng.integers(0, 56, (300, 32, 32, 3))).astype(np.uint8)
    model = cnn.plain_cnn("whitened", stages=(8,), whiten=2)
    assert init_from_data(model, images, seed=1) == ["whiten"]
    layer = model.get_layer("whiten")
    assert not layer.trainable and layer.output.shape[-1] == 24  # 2x2x3 directions, both signs

    whitened = keras.Model(model.input, layer.output).predict(images[:100], verbose=0)
    directions = whitened[:, :-1, :-1, :12].reshape(-1, 12)  # one sign; the last row/column sees padding
    np.testing.assert_allclose(directions.mean(axis=0), 0, atol=0.05)
    np.testing.assert_allclose(np.cov(directions, rowvar=False), np.eye(12), atol=0.1)
    np.testing.assert_allclose(whitened[..., 12:], -whitened[..., :12], atol=1e-5)

    plain = cnn.plain_cnn("plain", stages=(8,))
    assert init_from_data(plain, images) == []  # nothing to set: a model without the layer is left as built
