"""The catalogue resolves, reproduces the study's table, and rejects bad input loudly."""

from __future__ import annotations

import pydantic
import pytest

from cifar_mlops import config as cfg
from tests.conftest import skip_or_fail

# Study A's enhancement table, copied from DESIGN.md (the source study).
STUDY_A_TABLE = {
    "increased_epochs": {"1.0", "1.1", "2.1", "2.2", "2.4", "3.0", "3.1"},
    "bicubic_interpolation": {"1.1", "2.2"},
    "random_rotation": set(),
    "gaussian_blur": {"1.0"},
    "transfer_learning": {"3.1"},
    "decreased_learning_rate": {"2.0", "2.3", "3.1"},
    "increased_batch_size": {"2.1", "2.3", "2.4", "3.0", "3.1"},
    "adamw": {"2.2", "2.4"},
    "weighted_class_training": {"2.3", "3.0", "3.1"},
}
STUDY_A_ITERATIONS = ["1.0", "1.1", "2.0", "2.1", "2.2", "2.3", "2.4", "3.0", "3.1"]


@pytest.mark.parametrize("exp_id", cfg.list_experiments())
def test_every_catalogue_file_resolves(exp_id: str) -> None:
    config = cfg.resolve(exp_id)
    assert config.exp_id == exp_id
    assert config.description, f"{exp_id} has no description"
    assert config.parent is None or config.parent in cfg.list_experiments()
    if config.kind == "train":
        assert config.flat_params()["train.epochs"] == config.train.epochs


def test_catalogue_has_both_studies() -> None:
    ids = cfg.list_experiments()
    assert ids[: len(STUDY_A_ITERATIONS) + 1] == STUDY_A_ITERATIONS + ["3.2"]
    study_b = [e for e in ids if cfg.resolve(e).study == "B"]
    assert len(study_b) >= 8  # baseline, >= 4 refinements, final, stratified, augmented
    assert "smoke" in ids


def test_enhancement_catalogue_reproduces_study_a_table() -> None:
    catalogue = cfg.load_enhancements()
    study_a_rows = [name for name, entry in catalogue.items() if "A" in entry["studies"]]
    assert study_a_rows == list(STUDY_A_TABLE)
    for exp_id in STUDY_A_ITERATIONS:
        used = set(cfg.resolve(exp_id).enhancements)
        assert used == {name for name, ids in STUDY_A_TABLE.items() if exp_id in ids}, exp_id


def test_study_a_families_and_ensemble() -> None:
    assert {cfg.resolve(e).family for e in STUDY_A_ITERATIONS[:7]} == {"mobilenetv2"}
    assert {cfg.resolve(e).family for e in ("3.0", "3.1")} == {"densenet121"}
    ensemble = cfg.resolve("3.2")
    assert ensemble.kind == "ensemble"
    assert [(m.registered_model, m.exp_id) for m in ensemble.members] == [
        ("cifar10-mobilenetv2", "2.4"), ("cifar10-densenet121", "3.1")]


def assert_plain_stages(config: cfg.ExperimentConfig) -> None:
    """No known architecture: every convolution is its own stage, pooled; nothing adds or concatenates; the one
    extra convolution allowed is the fixed whitening layer (an initialisation: it learns nothing)."""
    import keras

    from cifar_mlops.models import create_model

    model = create_model(config.model.name, **{**config.model.settings(), "width": 0.25})
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    stages = [layer for layer in convolutions if layer.name != "whiten"]
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert [layer.name for layer in stages] == [f"conv{i}" for i in range(1, len(stages) + 1)] and len(pools) == len(stages)
    assert [layer.trainable for layer in convolutions if layer.name == "whiten"] == ([False] if config.model.whiten else [])
    assert not [layer for layer in model.layers if isinstance(layer, (keras.layers.Add, keras.layers.Concatenate))]


def test_study_b_keeps_its_constraints_but_in_the_planned_follow_ups() -> None:
    study_b = {e: cfg.resolve(e) for e in cfg.list_experiments() if cfg.resolve(e).study == "B"}
    stratified, augmented = study_b.pop("b6"), study_b.pop("b7")  # the study's planned next steps
    unconstrained = study_b.pop("b9")  # beyond the study's rules
    assert {"b0", "b5", "b8"} <= set(study_b)  # b8: this project's final iteration under the study's rules
    for config in study_b.values():
        assert config.family == "cnn"
        assert (config.data.split, config.data.train_size, config.data.val_size) == ("random", 5000, 5000)
        assert config.augment == cfg.AugmentConfig(), f"{config.exp_id} augments"
        assert_plain_stages(config)
    assert stratified.data.split == "stratified" and stratified.augment == cfg.AugmentConfig()
    assert augmented.data.split == "stratified" and augmented.augment != cfg.AugmentConfig()
    assert unconstrained.augment == augmented.augment and unconstrained.model.test_time_flip
    assert unconstrained.model.weights is None  # lifted rules, still no pretrained weights
    with pytest.raises(AssertionError):
        assert_plain_stages(unconstrained)  # two convolutions per stage: the rule it lifts


def test_precedence_defaults_base_enhancement_file_set() -> None:
    config = cfg.resolve("2.2")
    assert config.train.momentum == cfg.TrainConfig().momentum  # default
    assert config.model.dropout == 0.2  # base
    assert config.train.optimizer == "adamw" and config.model.interpolation == "bicubic"  # enhancements
    assert cfg.resolve("b7").train.epochs == 40  # the file beats the base it extends
    assert cfg.resolve("2.2", {"train.epochs": 3}).train.epochs == 3  # --set beats everything


def test_with_overrides_sets_keys_of_a_resolved_config_as_resolve_does() -> None:
    for exp_id in ("2.4", "3.2"):  # a training and an ensemble
        config = cfg.resolve(exp_id)
        assert cfg.with_overrides(config, {"data.val_size": 123}, "x") == cfg.resolve(exp_id, {"data.val_size": 123})
        assert cfg.with_overrides(config, {}, "x") == config
    config = cfg.resolve("2.4")
    for overrides, expected in [({"train.epoch": 5}, "--set: train.epoch: unknown key; known keys here: epochs"),
                                ({"train.epochs": "ten"}, "--set: train.epochs: Input should be a valid integer"),
                                ({"train.epochs.x": 1}, "--set: train.epochs is a value, not a section"),
                                ({"parent": "x"}, "--set parent: experiment metadata cannot be overridden")]:
        with pytest.raises(cfg.ConfigError, match=f"^{expected}"):
            cfg.with_overrides(config, overrides, "config.yaml of run abc")


def test_resolved_config_is_frozen_and_round_trips_through_yaml() -> None:
    import yaml

    config = cfg.resolve("3.1")
    with pytest.raises(pydantic.ValidationError, match="Instance is frozen"):  # frozen pydantic models
        config.train.epochs = 1  # type: ignore[misc]
    assert cfg.ExperimentConfig.model_validate(yaml.safe_load(cfg.to_yaml(config))) == config


@pytest.mark.parametrize(
    ("exp_id", "overrides", "expected"),
    [
        ("nope", {}, "unknown experiment 'nope'; known experiments: 1.0, 1.1"),
        ("../etc/passwd", {}, "is not an experiment id"),
        ("/tmp/x", {}, "is not an experiment id"),
        ("2.4", {"train.epoch": 5}, "--set: train.epoch: unknown key; known keys here: epochs, batch_size"),
        ("2.4", {"train.epochs": "ten"}, "--set: train.epochs: Input should be a valid integer"),
        ("2.4", {"train.epochs": 0}, "--set: train.epochs: Input should be greater than or equal to 1"),
        ("2.4", {"model.name": "resnet50"}, "--set: model.name: unknown model 'resnet50'; known models: cnn_b0"),
        ("2.4", {"data.split": "chaotic"}, "--set: data.split: Input should be 'random' or 'stratified'"),
        ("2.4", {"exp_id": "x"}, "experiment metadata cannot be overridden"),
        ("smoke", {"data.data_dir": "/data"}, "data.source is synthetic; add --set data.source=cifar10"),
        ("2.4", {"train.warmup_epochs": 2}, "warmup_epochs needs pretrained model.weights"),
    ],
)
def test_bad_input_is_one_line_naming_source_and_key(exp_id, overrides, expected) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.resolve(exp_id, overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


@pytest.fixture
def catalogue(tmp_path, monkeypatch):
    """A scratch catalogue folder with one base and the real enhancements file."""
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "tiny.yaml").write_text("model:\n  name: cnn_tiny\n")
    (tmp_path / "enhancements.yaml").write_text((cfg.experiments_dir() / "enhancements.yaml").read_text())
    monkeypatch.setenv("CIFAR_MLOPS_EXPERIMENTS", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("extends: tiny\ntrain:\n  epochz: 3\n", "/x.yaml: train.epochz: unknown key"),
        ("extends: tiny\ntrain:\n  epochs: 2.5\n", "x.yaml: train.epochs: Input should be a valid integer"),
        ("extends: tiny\ntrain:\n  learning_rate: -1\n", "x.yaml: train.learning_rate: Input should be greater than 0"),
        ("extends: tiny\nenhancements: [more_magic]\n", "x.yaml: enhancements: unknown enhancement 'more_magic'"),
        ("extends: tiny\ntrain: [1, 2\n", "x.yaml: line 3 is not valid YAML (expected ',' or ']'"),
        ("extends: x\n", "`extends` forms a cycle"),
        ("train:\n  epochs: 3\n", "x.yaml: model: missing"),
    ],
)
def test_errors_in_a_file_name_the_file_and_key(catalogue, text, expected) -> None:
    (catalogue / "x.yaml").write_text(text)
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.resolve("x")
    assert expected in str(caught.value)


def test_base_value_errors_name_the_base_file(catalogue) -> None:
    (catalogue / "bases" / "tiny.yaml").write_text("model:\n  name: cnn_tiny\n  dropout: 2\n")
    (catalogue / "x.yaml").write_text("extends: tiny\n")
    with pytest.raises(cfg.ConfigError, match=r"bases/tiny.yaml: model.dropout: Input should be less than 1"):
        cfg.resolve("x")


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["train.epochs=5"], {"train.epochs": 5}),
        (["train.learning_rate=1e-4", "model.weights=imagenet"], {"train.learning_rate": "1e-4", "model.weights": "imagenet"}),
        (["augment.flip=true", "model.blocks=[1,1,1,1]"], {"augment.flip": True, "model.blocks": [1, 1, 1, 1]}),
        (["model.weights="], {"model.weights": None}),
    ],
)
def test_parse_overrides(pairs, expected) -> None:
    assert cfg.parse_overrides(pairs) == expected


def test_catalogue_yaml_is_read_by_libyaml_when_pyyaml_has_it_and_reads_the_same(monkeypatch) -> None:
    """enhancements.yaml is read on every resolve: the C parser (CSafeLoader) reads it, with SafeLoader's result;
    invalid YAML still says what the pure parser says (see the bad-file cases above)."""
    yaml = pytest.importorskip("yaml")
    if not hasattr(yaml, "CSafeLoader"):
        skip_or_fail("PyYAML without libyaml (PyPI's wheels include it): the pure-Python loader is all there is")
    loaders, load = [], yaml.load

    def spy(stream, Loader):  # yaml.load's own argument name
        loaders.append(Loader)
        return load(stream, Loader=Loader)

    monkeypatch.setattr(yaml, "load", spy)
    assert cfg.resolve("2.4").train.epochs > 0
    assert loaders and set(loaders) == {yaml.CSafeLoader}
    monkeypatch.undo()
    for path in sorted(cfg.experiments_dir().rglob("*.yaml")):
        assert cfg._read_yaml(path) == (yaml.load(path.read_text(), Loader=yaml.SafeLoader) or {}), path
    config = cfg.resolve("2.4")
    assert cfg.from_yaml(cfg.to_yaml(config), "x") == config


def test_yaml_style_float_strings_are_accepted_as_numbers() -> None:
    assert cfg.resolve("2.4", cfg.parse_overrides(["train.learning_rate=1e-4"])).train.learning_rate == 1e-4


@pytest.mark.parametrize("pair", ["epochs=5", "train.epochs", "=5", "train..epochs=1", "../x=1"])
def test_malformed_overrides_are_rejected(pair) -> None:
    with pytest.raises(cfg.ConfigError, match="expected section.key=value"):
        cfg.parse_overrides([pair])


def test_split_overrides_accepts_spaces_and_commas() -> None:
    assert cfg.split_overrides("train.epochs=5, data.val_size=10  x.y=1") == ["train.epochs=5", "data.val_size=10", "x.y=1"]
    assert cfg.split_overrides("") == []
