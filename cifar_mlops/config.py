"""Experiment files -> one validated, frozen config object.

Precedence, lowest first: field defaults < base (`extends:`) < enhancements
(in the order listed) < the experiment file's own sections < `--set` overrides.
Every value remembers where it came from, so a bad one is reported as
`experiments/2.4.yaml: train.epochs: ...` or `--set train.epochs: ...`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cifar_mlops import models
from cifar_mlops.errors import UserError, first_line

EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Experiment metadata: read from the experiment's own file only (never inherited through `extends:`, never
# `--set`), not training settings. `published`: the source study's own figures for this iteration. `selected`:
# how `cifar-mlops select` chose a generated iteration (`Selected`); checked, never part of the config.
META_KEYS = ("description", "study", "extends", "parent", "enhancements", "kind", "published", "selected")
STUDY_A_ENHANCEMENTS_FILE = "enhancements.yaml"
RULES_KEY = "rules"  # the enhancement catalogue's block of study rules (`StudyRules`), not an enhancement
GENERATED_DIR = "generated"  # experiments/generated/: the iterations `cifar-mlops select` writes


class ConfigError(UserError):
    """An experiment file, enhancement or `--set` that does not resolve; the message names file and key."""

    exit_code = 2


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    source: Literal["cifar10", "synthetic"] = "cifar10"
    data_dir: str | None = None  # an existing cifar-10-batches-py folder; None: $CIFAR10_DIR, else download
    cache_dir: str | None = None  # where the downloaded archive is kept; None: ~/.cache/cifar-mlops
    split: Literal["random", "stratified"] = "stratified"  # how validation images are drawn from the training set
    train_size: int | None = Field(None, ge=1)  # images; None: every training image not used for validation
    val_size: int = Field(5000, ge=1)  # images held out of the training set
    test_size: int | None = Field(None, ge=1)  # images of the test set; None: all of it
    seed: int = 0  # split seed
    synthetic_train_pool: int = Field(2000, ge=20)  # synthetic source only: generated training images
    synthetic_test_pool: int = Field(500, ge=10)  # synthetic source only: generated test images

    @model_validator(mode="after")
    def _data_dir_needs_real_source(self) -> DataConfig:
        if self.source == "synthetic" and self.data_dir:
            raise ValueError("data_dir is set but data.source is synthetic; add --set data.source=cifar10")
        return self


class AugmentConfig(Strict):
    """Random training-time changes, applied per batch by the input pipeline (never to val/test)."""

    flip: bool = False  # random horizontal flip
    rotation: float = Field(0.0, ge=0, le=180)  # degrees, maximum absolute random rotation
    translation: float = Field(0.0, ge=0, lt=1)  # fraction of the image side, maximum random shift
    blur_sigma: float = Field(0.0, ge=0, le=5)  # px, maximum std of a random gaussian blur; 0: off
    # px, side of a square set to mid-grey at a random place of every image (Cutout; it may reach past the
    # border, so less is hidden near one); 0: off
    cutout: int = Field(0, ge=0, le=32)
    # alpha of the Beta(alpha, alpha) distribution each training image's mixing weight is drawn from: MixUp
    # blends every image (and its one-hot label) with another image of its batch, CutMix pastes a box of another
    # image over it (the labels weighted by the area each keeps); 0: off (0.2-1 are usual values)
    mixup: float = Field(0.0, ge=0, le=10)
    cutmix: float = Field(0.0, ge=0, le=10)


class ModelConfig(Strict):
    name: str  # a registered model: see `cifar-mlops experiments --models`
    image_size: int = Field(32, ge=32, le=512)  # px, side the model resizes its raw 32x32 input to
    interpolation: Literal["bilinear", "bicubic", "nearest", "area"] = "bilinear"  # for that resize
    weights: str | None = None  # None: random init; "imagenet"; or a path to a no-top .h5 weights file
    width: float = Field(1.0, gt=0, le=2)  # channel multiplier (MobileNetV2 alpha, CNN filters)
    blocks: tuple[int, ...] | None = None  # DenseNet layers per dense block; None: DenseNet-121's (6, 12, 24, 16)
    dropout: float = Field(0.0, ge=0, lt=1)  # fraction, before the classifier
    stage_dropout: float = Field(0.0, ge=0, lt=1)  # fraction, after every stage's pooling (study B's CNNs)
    # px, side of the patches a fixed first layer whitens, set from the training images (study B's CNNs); 0: none
    whiten: int = Field(0, ge=0, le=4)
    # predict every image as the mean of its own and its mirror image's probabilities (test-time flips): in
    # the run's evaluation and wherever its logged model is served. How the model predicts, not how it is built
    test_time_flip: bool = False

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        try:
            models.get_model_entry(name)
        except models.UnknownModel as err:
            raise ValueError(str(err)) from None
        return name

    @property
    def family(self) -> str:
        return models.get_model_entry(self.name).family

    def settings(self) -> dict[str, Any]:
        """The settings changed from their defaults, as `models.create_model(name, **settings)` takes them.

        Defaults are left out so that a model is only handed what it uses; the factories'
        defaults equal these fields' (tests/test_models.py checks it). `test_time_flip` is not one:
        it is how the trained model predicts (`image_model.flip_averaged`).
        """
        return self.model_dump(exclude={"name", "test_time_flip"}, exclude_defaults=True)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)  # full passes over the training split (warm-up included)
    batch_size: int = Field(128, ge=1)  # images per step
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0, le=10)  # initial step size
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to 0 over the run
    weight_decay: float = Field(0.0, ge=0, lt=1)  # decoupled decay (adamw, sgd); per step, times the LR
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weight: Literal["none", "balanced"] = "none"  # balanced: weight classes by inverse frequency
    warmup_epochs: int = Field(0, ge=0)  # transfer learning: epochs with the backbone frozen, then fine-tune
    finetune_lr_factor: float = Field(0.1, gt=0, le=1)  # fine-tuning LR = learning_rate * this
    early_stopping_patience: int | None = Field(None, ge=1)  # epochs without val_accuracy gain; None: off
    seed: int = 0  # weights init and shuffling
    # epochs between checkpoints (model, optimizer state, epoch) logged to the run, each replacing the one
    # before, so `train --resume RUN_ID` can continue a lost training; 0: no checkpoints
    checkpoint_every: int = Field(1, ge=0)
    steps_per_execution: int = Field(1, ge=1)  # batches per compiled call; higher cuts Python overhead
    # training images whose batch statistics replace BatchNorm's moving averages before each epoch's
    # validation ("precise BN", cifar_mlops.batchnorm): the evaluated model's statistics are those of its
    # weights; 0: keep the moving averages. 512 costs ~4% of an epoch of 3,336 images (benchmarks/RESULTS.md)
    bn_recompute_images: int = Field(512, ge=0)
    # devices trained on at once, data-parallel (each step's train.batch_size images split between them):
    # 1, N or "all"; GPUs where there are, else the CPU (see cifar_mlops.backend.data_parallel)
    devices: Annotated[int, Field(ge=1)] | Literal["all"] = 1
    # Keras dtype policy; auto: mixed_float16 where a GPU is visible (tensor cores); on a CPU with bfloat16
    # instructions mixed_bfloat16 for the models measured as accurate and faster in it (train.CPU_BFLOAT16_MODELS),
    # else float32 (float16 is emulated on CPUs and slower; see benchmarks/RESULTS.md)
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"

    @model_validator(mode="after")
    def _warmup_shorter_than_run(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self


class TrackConfig(Strict):
    """What is logged beside a training, not how it trains: it changes no result (see `to_yaml`)."""

    # seconds between samples of MLflow's system metrics (system/cpu_utilization_percentage, system/
    # system_memory_usage_megabytes, disk, network; GPU utilisation and memory where nvidia-ml-py sees a GPU),
    # each sample one step of the run's system/* metrics; 0: off. Cost at 10 s: benchmarks/bench_system_metrics.py
    system_metrics_interval: float = Field(10.0, ge=0)


class FloatRange(Strict):
    low: float  # smallest value tried
    high: float  # largest value tried (may equal low: the value is then fixed)
    log: bool = False  # sample on a log scale (learning rates, weight decay)

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) must not exceed high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0 (got {self.low:g})")
        return self


class IntRange(Strict):
    low: int  # smallest value tried
    high: int  # largest value tried
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class SearchSpace(Strict):
    """What `cifar-mlops tune` searches; each set dimension overrides `train.<name>` per trial.

    A dimension left out (null) keeps the experiment's own value. Pruning stops a
    trial whose per-epoch val_accuracy falls below the pruner's threshold.
    """

    learning_rate: FloatRange | None = None  # e.g. {low: 1.0e-4, high: 1.0e-2, log: true}
    batch_size: tuple[int, ...] | None = Field(None, min_length=1)  # choices, e.g. [32, 64, 128]
    epochs: IntRange | None = None  # e.g. {low: 5, high: 30}
    weight_decay: FloatRange | None = None  # only matters for adamw and sgd
    optimizer: tuple[Literal["adam", "adamw", "sgd"], ...] | None = Field(None, min_length=1)  # choices
    # median, percentile: finished trials before they prune anything; epochs every trial runs before it can be
    # pruned (0: pruned after its first epoch at the earliest). 2 and 0: the setting that kept the best within
    # 1 point at <= 40% of the epochs in every seed, replayed on stored curves (benchmarks/RESULTS.md)
    pruning_startup_trials: int = Field(2, ge=0)
    pruning_warmup_epochs: int = Field(0, ge=0)
    # percentile pruner: the top share (%) of trials it keeps at each epoch: a trial stops when its best value
    # so far is below the finished trials' values at that epoch that are in this top share (50: the median
    # pruner; lower prunes more)
    pruning_percentile: float = Field(50.0, gt=0, lt=100)
    pruning_reduction_factor: int = Field(3, ge=2)  # successive-halving, hyperband: 1 in this many goes on per rung

    def dimensions(self) -> dict[str, Any]:
        """The searched dimensions: name -> FloatRange, IntRange or a tuple of choices."""
        names = ("learning_rate", "batch_size", "epochs", "weight_decay", "optimizer")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


PUBLISHED_METRICS = tuple(f"{split}_{metric}" for split in ("train", "val", "test")
                          for metric in ("accuracy", "f1_macro"))


class PublishedFigures(Strict):
    """The source study's own figures for one iteration (a `published:` block), set beside ours in reports."""

    note: str = ""  # what the figures are, e.g. "the study's own figures (full CIFAR-10, GPU), not runs of this store"
    train_accuracy: float | None = Field(None, ge=0, le=1)  # fractions, like the metrics runs log
    train_f1_macro: float | None = Field(None, ge=0, le=1)
    val_accuracy: float | None = Field(None, ge=0, le=1)
    val_f1_macro: float | None = Field(None, ge=0, le=1)
    test_accuracy: float | None = Field(None, ge=0, le=1)
    test_f1_macro: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _some_figure(self) -> PublishedFigures:
        if not self.values():
            raise ValueError(f"give at least one of {', '.join(PUBLISHED_METRICS)}")
        return self

    def values(self) -> dict[str, float]:
        """Metric name -> published value, for the metrics given."""
        return {name: getattr(self, name) for name in PUBLISHED_METRICS if getattr(self, name) is not None}


ENHANCEMENT_KINDS = ("training", "model", "input", "split", "augmentation", "test_time_augmentation",
                     "pretrained_weights", "known_architecture")
EnhancementKind = Literal["training", "model", "input", "split", "augmentation", "test_time_augmentation",
                          "pretrained_weights", "known_architecture"]


class Enhancement(Strict):
    """One entry of `experiments/enhancements.yaml`: one named change."""

    label: str  # its row in the study's check-mark table
    studies: tuple[str, ...] = ()  # the studies whose table has the row (and whose `select` proposes it)
    description: str = ""
    # what sort of change it is, what a study's rules forbid (`StudyRules.forbids`): training (optimiser,
    # schedule, epochs, batch, loss), model (a layer of this project's own networks), input (how the model sees
    # its 32x32 input), split (how validation images are drawn), augmentation (random changes to training
    # images), test_time_augmentation (predictions averaged over changed copies of an image), pretrained_weights,
    # known_architecture (VGG, ResNet, DenseNet blocks); none: not classified (a study with rules refuses it)
    kind: EnhancementKind | None = None
    set: dict[str, Any]  # dotted key -> value

    @field_validator("set")
    @classmethod
    def _dotted_keys(cls, values: dict[str, Any]) -> dict[str, Any]:
        bad = [key for key in values if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", str(key))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a dotted section.key")
        return values


class StudyRules(Strict):
    """A study's constraint, as data: `text` quotes the study, `forbids` maps each kind of enhancement it rules
    out to the words of `text` that rule it out (checked to be a quote)."""

    text: str
    forbids: dict[EnhancementKind, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reasons_quote_the_text(self) -> StudyRules:
        flat = " ".join(self.text.split())
        for kind, reason in self.forbids.items():
            if " ".join(reason.split()) not in flat:
                raise ValueError(f"forbids.{kind}: {reason!r} is not a quote of the study's text")
        return self

    def refusal(self, name: str, entry: dict[str, Any]) -> str | None:
        """Why these rules rule out enhancement `name` (its catalogue entry), or None when they allow it."""
        kind = entry.get("kind")
        if kind is None:
            return f"{name} has no `kind:` in {STUDY_A_ENHANCEMENTS_FILE}: the rules cannot be checked for it"
        if kind in self.forbids:
            return f"{name} is {kind.replace('_', ' ')}: the study says {self.forbids[kind]!r}"
        return None


class SelectedStep(Strict):
    """One kept step of a forward selection: the enhancement it added and the evidence it was kept on."""

    step: int = Field(ge=1)
    added: str
    effect_pp: float  # mean paired difference of the primary metric, percentage points
    interval_pp: tuple[float, float]  # the verdict's repeated interval, percentage points
    level: float = Field(gt=0, lt=1)  # its confidence level
    verdict: str
    seeds: int = Field(ge=2)
    ablation_run_id: str  # the step's ablation parent run (its own nested runs)


class Selected(Strict):
    """The `selected:` block of a generated experiment: which `select` wrote it and why each step was kept."""

    selection: str  # the selection's name, e.g. "b5 select"
    run_id: str  # its MLflow parent run
    metric: str
    alpha: float = Field(gt=0, lt=1)
    min_effect_pp: float = Field(gt=0)
    max_seeds: int = Field(ge=2)
    overrides: dict[str, Any] = Field(default_factory=dict)  # the --set values every step trained with
    steps: tuple[SelectedStep, ...] = Field(min_length=1)


class ExperimentConfig(Strict):
    """A trainable experiment: everything `train(config)` needs."""

    kind: Literal["train"] = "train"
    exp_id: str
    description: str = ""
    study: str = ""  # "A", "B" or "smoke"
    parent: str | None = None  # the iteration this one is compared against in reports
    enhancements: tuple[str, ...] = ()
    published: PublishedFigures | None = None  # the source study's figures (metadata, not a setting)
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    search: SearchSpace = SearchSpace()  # what `cifar-mlops tune` searches (not a training setting)
    track: TrackConfig = TrackConfig()  # what is logged beside the training (not a training setting)

    @model_validator(mode="after")
    def _transfer_learning_is_consistent(self) -> ExperimentConfig:
        if self.train.warmup_epochs and self.model.weights is None:
            raise ValueError("train.warmup_epochs needs pretrained model.weights (imagenet or a file)")
        return self

    @property
    def family(self) -> str:
        return self.model.family

    def flat_params(self) -> dict[str, Any]:
        """Every resolved setting as `section.key` -> value (what MLflow logs as params)."""
        return flatten(self.model_dump(exclude={"kind", "exp_id", "description", "enhancements", "published",
                                                 "search"}))


class EnsembleMember(Strict):
    registered_model: str  # e.g. cifar10-mobilenetv2
    exp_id: str | None = None  # newest version tagged with this exp_id ...
    alias: str | None = None  # ... or the version holding this alias ...
    version: int | None = Field(None, ge=1)  # ... or this exact version
    weight: float = Field(1.0, ge=0)  # soft-voting weight

    @model_validator(mode="after")
    def _one_selector(self) -> EnsembleMember:
        chosen = [k for k in ("exp_id", "alias", "version") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of exp_id, alias or version")
        return self


class EnsembleConfig(Strict):
    """An ensemble experiment: soft voting over registered model versions."""

    kind: Literal["ensemble"] = "ensemble"
    exp_id: str
    description: str = ""
    study: str = ""
    parent: str | None = None
    enhancements: tuple[str, ...] = ()
    published: PublishedFigures | None = None
    members: tuple[EnsembleMember, ...] = Field(min_length=2)
    voting: Literal["soft"] = "soft"  # mean of the members' class probabilities
    fit_weights: bool = False  # fit member weights on the validation split
    data: DataConfig = DataConfig()
    batch_size: int = Field(128, ge=1)  # images per prediction batch

    @property
    def family(self) -> str:
        return "ensemble"  # registered as cifar10-ensemble

    def flat_params(self) -> dict[str, Any]:
        return flatten(self.model_dump(exclude={"kind", "exp_id", "description", "enhancements", "published"}))


Config = ExperimentConfig | EnsembleConfig


# ---------------------------------------------------------------------------
# Locating and reading files


def experiments_dir() -> Path:
    """The catalogue folder: $CIFAR_MLOPS_EXPERIMENTS, else `experiments/` beside the package."""
    env = os.environ.get("CIFAR_MLOPS_EXPERIMENTS")
    folder = Path(env) if env else Path(__file__).resolve().parent.parent / "experiments"
    if not folder.is_dir():
        raise ConfigError(
            f"experiment catalogue not found at {folder}; install the project with `pip install -e .` "
            "from its clone, or set CIFAR_MLOPS_EXPERIMENTS to its experiments/ folder"
        )
    return folder


def list_experiments() -> list[str]:
    """Experiment ids in catalogue order: study A by number, then study B, then the rest."""
    ids = [p.stem for p in experiments_dir().glob("*.yaml") if p.name != STUDY_A_ENHANCEMENTS_FILE]
    return sorted(ids, key=_catalogue_order)


def _catalogue_order(exp_id: str) -> tuple:
    group = 0 if exp_id[0].isdigit() else 1 if re.match(r"b\d", exp_id) else 2
    return group, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", exp_id)]


# libyaml's parser when PyYAML was built with it (about 10x faster: enhancements.yaml is read on every resolve); the
# constructor and resolver are SafeLoader's either way, so what it reads is the same
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, parsed by `_FAST_LOADER`. Text it rejects is parsed again by the pure-Python parser,
    whose error (raised) names the problem as before (libyaml's says less) and which reads what it alone accepts."""
    try:
        return yaml.load(text, Loader=_FAST_LOADER)  # a safe loader: CSafeLoader or SafeLoader
    except yaml.YAMLError:
        if _FAST_LOADER is yaml.SafeLoader:
            raise
        return yaml.safe_load(text)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{_show(path)}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{_show(path)}: expected a mapping of keys at the top level")
    return data


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(experiments_dir().parent))
    except ValueError:
        return str(path)


def load_enhancements() -> dict[str, dict[str, Any]]:
    """The enhancement catalogue: name -> {label, studies, description, kind, set: {dotted.key: value}}
    (`Enhancement`), without the `rules:` block (`load_study_rules`)."""
    path = experiments_dir() / STUDY_A_ENHANCEMENTS_FILE
    catalogue = {name: entry for name, entry in _read_yaml(path).items() if name != RULES_KEY}
    for name, entry in catalogue.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("set"), dict) or "label" not in entry:
            raise ConfigError(f"{_show(path)}: {name}: each enhancement needs `label` and a `set:` mapping")
        _checked(Enhancement, entry, f"{_show(path)}: {name}")
    return catalogue


def load_study_rules() -> dict[str, StudyRules]:
    """Study -> its rules, from the `rules:` block of the enhancement catalogue (studies without one: none)."""
    path = experiments_dir() / STUDY_A_ENHANCEMENTS_FILE
    block = _read_yaml(path).get(RULES_KEY) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{_show(path)}: {RULES_KEY}: must map each study to its rules (text, forbids)")
    return {str(study): _checked(StudyRules, rules, f"{_show(path)}: {RULES_KEY}.{study}")
            for study, rules in block.items()}


def _checked(schema: type[BaseModel], fields: Any, where: str) -> Any:
    """`fields` validated as `schema`; a ConfigError naming `where` and the key otherwise."""
    try:
        return schema.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        key = "".join(f"{p}: " for p in [".".join(str(p) for p in first["loc"])] if p)
        message = (f"unknown key; known keys here: {', '.join(_known_keys(schema, first['loc'][:-1]))}"
                   if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, "))
        raise ConfigError(f"{where}: {key}{message}") from None


def generated_dir() -> Path:
    """Where `cifar-mlops select` writes the iterations it chose, and where experiment ids are looked up after
    the catalogue: $CIFAR_MLOPS_GENERATED, else `generated/` in the catalogue folder."""
    env = os.environ.get("CIFAR_MLOPS_GENERATED")
    return Path(env) if env else experiments_dir() / GENERATED_DIR


def selected_block(exp_id: str) -> Selected | None:
    """The `selected:` block of experiment `exp_id`'s own file (a generated iteration's), or None."""
    path = _experiment_path(exp_id)
    raw = _read_yaml(path).get("selected")
    return None if raw is None else _checked(Selected, raw, f"{_show(path)}: selected")


def _experiment_path(exp_id: str) -> Path:
    if not isinstance(exp_id, str) or not EXPERIMENT_ID.match(exp_id) or ".." in exp_id:
        raise ConfigError(f"{exp_id!r} is not an experiment id (ids are names like 2.4 or b5, never paths)")
    path = experiments_dir() / f"{exp_id}.yaml"
    if not path.is_file() and (generated_dir() / f"{exp_id}.yaml").is_file():
        path = generated_dir() / f"{exp_id}.yaml"  # an iteration `select` wrote
    if exp_id == Path(STUDY_A_ENHANCEMENTS_FILE).stem or not path.is_file():
        raise ConfigError(f"unknown experiment {exp_id!r}; known experiments: {', '.join(list_experiments())}")
    return path


# ---------------------------------------------------------------------------
# Resolution


class _Layered:
    """A nested dict being built up layer by layer, remembering each key's origin."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.origin: dict[str, str] = {}

    def set(self, dotted: str, value: Any, origin: str) -> None:
        *parents, leaf = dotted.split(".")
        node = self.values
        for i, key in enumerate(parents):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{origin}: {'.'.join(parents[: i + 1])} is a value, not a section")
            node = child
        node[leaf] = copy.deepcopy(value)
        self.origin[dotted] = origin

    def merge(self, sections: dict[str, Any], origin: str, prefix: str = "") -> None:
        for key, value in sections.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                self.merge(value, origin, prefix=f"{dotted}.")
            else:
                self.set(dotted, value, origin)

    def origin_of(self, dotted: str, fallback: str) -> str:
        while dotted:
            if dotted in self.origin:
                return self.origin[dotted]
            dotted = dotted.rpartition(".")[0]
        return fallback


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["train.epochs=5", "model.weights=imagenet"]` -> {dotted key: YAML-typed value}."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
            raise ConfigError(f"--set {pair!r}: expected section.key=value, e.g. --set train.epochs=5")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            overrides[key] = raw
    return overrides


def split_overrides(text: str | None) -> list[str]:
    """The MLproject `overrides` parameter: `key=value` pairs separated by spaces or commas."""
    return [item for item in re.split(r"[\s,]+", text or "") if item]


def resolve(exp_id: str, overrides: dict[str, Any] | None = None, *,
            enhancements: Sequence[str] | None = None) -> Config:
    """Resolve experiment `exp_id` with optional `--set` overrides into a validated config.

    `enhancements` replaces the experiment's own list (inherited ones included): those it drops are not
    applied at any level of `extends:`, those it adds are applied after the inherited ones, before the
    file's own sections. Ablations build their variants this way.
    """
    if enhancements is not None:
        known = load_enhancements()
        unknown = [name for name in enhancements if name not in known]
        if unknown:
            raise ConfigError(f"unknown enhancement {unknown[0]!r}; known: {', '.join(known)}")
    layered, meta, kind = _layer_experiment(exp_id, seen=(), wanted=None if enhancements is None
                                            else tuple(enhancements))
    _set_overrides(layered, overrides)
    schema = EnsembleConfig if kind == "ensemble" else ExperimentConfig
    fields = {**layered.values, **meta, "exp_id": exp_id}
    try:
        return schema.model_validate(fields)
    except ValidationError as err:
        raise ConfigError(_describe(err, layered, schema, _show(_experiment_path(exp_id)))) from None


def with_overrides(config: Config, overrides: dict[str, Any], where: str) -> Config:
    """`config` (read from `where`, e.g. a run's config.yaml) with dotted `--set` overrides applied as
    `resolve` applies them, validated again; a bad key or value is a ConfigError naming it."""
    layered = _Layered()
    layered.merge(config.model_dump(mode="json", exclude={"exp_id", *META_KEYS}), where)
    _set_overrides(layered, overrides)
    schema = type(config)
    meta = config.model_dump(mode="json", include={"exp_id", *META_KEYS})
    try:
        return schema.model_validate({**layered.values, **meta})
    except ValidationError as err:
        raise ConfigError(_describe(err, layered, schema, where)) from None


def _set_overrides(layered: _Layered, overrides: dict[str, Any] | None) -> None:
    for dotted, value in (overrides or {}).items():
        if dotted.split(".")[0] in META_KEYS + ("exp_id",):
            raise ConfigError(f"--set {dotted}: experiment metadata cannot be overridden")
        layered.set(dotted, value, "--set")


def _layer_experiment(exp_id: str, seen: tuple[str, ...],
                      wanted: tuple[str, ...] | None = None) -> tuple[_Layered, dict[str, Any], str]:
    if exp_id in seen:
        raise ConfigError(f"experiments {' -> '.join(seen + (exp_id,))}: `extends` forms a cycle")
    path = _experiment_path(exp_id)
    where = _show(path)
    raw = _read_yaml(path)
    kind = raw.get("kind", "train")
    if kind not in ("train", "ensemble"):
        raise ConfigError(f"{where}: kind: must be train or ensemble, not {kind!r}")

    extends = raw.get("extends")
    inherited: tuple[str, ...] = ()  # enhancements of the experiment this one extends
    if extends is None:
        layered = _Layered()
    elif not isinstance(extends, str):
        raise ConfigError(f"{where}: extends: must be the name of a base or of another experiment")
    elif (experiments_dir() / "bases" / f"{extends}.yaml").is_file():
        layered = _Layered()
        base_path = experiments_dir() / "bases" / f"{extends}.yaml"
        layered.merge(_read_yaml(base_path), _show(base_path))
    else:
        layered, extended_meta, extended_kind = _layer_experiment(extends, seen + (exp_id,), wanted)
        if extended_kind != kind:
            raise ConfigError(f"{where}: extends: {extends} is a {extended_kind} experiment, this one a {kind}")
        inherited = extended_meta["enhancements"]

    enhancements = raw.get("enhancements") or []
    if not isinstance(enhancements, list) or not all(isinstance(e, str) for e in enhancements):
        raise ConfigError(f"{where}: enhancements: must be a list of enhancement names")
    if wanted is not None:  # an ablation variant: drop what is not wanted; the top level adds the rest
        enhancements = [e for e in enhancements if e in wanted]
        if not seen:
            enhancements += [e for e in wanted if e not in inherited and e not in enhancements]
    if enhancements:
        catalogue = load_enhancements()
        for name in enhancements:
            if name not in catalogue:
                raise ConfigError(
                    f"{where}: enhancements: unknown enhancement {name!r}; known: {', '.join(catalogue)}"
                )
            for dotted, value in catalogue[name]["set"].items():
                layered.set(dotted, value, f"enhancement {name} (experiments/{STUDY_A_ENHANCEMENTS_FILE})")

    sections = {k: v for k, v in raw.items() if k not in META_KEYS}
    layered.merge(sections, where)
    meta = {k: raw[k] for k in META_KEYS if k in raw and k not in ("extends", "selected")}
    if "selected" in raw:  # metadata of the file alone, checked here, never a setting
        _checked(Selected, raw["selected"], f"{where}: selected")
    meta["enhancements"] = inherited + tuple(e for e in enhancements if e not in inherited)
    meta["kind"] = kind
    if meta.get("parent") is not None:
        meta["parent"] = str(meta["parent"])
    return layered, meta, kind


def _describe(err: ValidationError, layered: _Layered, schema: type[BaseModel], experiment_file: str) -> str:
    first = err.errors()[0]
    dotted = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "(top level)"
    origin = experiment_file if dotted.split(".")[0] in META_KEYS else layered.origin_of(dotted, experiment_file)
    if first["type"] == "extra_forbidden":
        known = _known_keys(schema, first["loc"][:-1])
        message = f"unknown key; known keys here: {', '.join(known)}"
    elif first["type"] == "missing":
        message = "missing: set it in the experiment file, its base, or with --set"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], dict) and repr(first["input"]) not in message:
            message += f" (got {first['input']!r})"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}: {dotted}: {message}{more}"


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    model = schema
    for part in (p for p in loc if not isinstance(p, int)):
        annotation = model.model_fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    return list(model.model_fields)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_seeds(text: str) -> list[int]:
    """`--seeds 3` -> [0, 1, 2]; `--seeds 0,3,7` -> [0, 3, 7] (values of `train.seed`)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise ConfigError(f"--seeds takes a count (3) or a list (0,3,7), not {text!r}")
    seeds = list(range(int(parts[0]))) if len(parts) == 1 else [int(p) for p in parts]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: give at least one seed, each once")
    return seeds


def check_kind(config: Config, kind: str) -> None:
    """The command named by an experiment's kind runs it: `train` trains, `ensemble` soft-votes."""
    if config.kind != kind:
        described = {"ensemble": "an ensemble", "train": "a training"}[config.kind]
        raise ConfigError(f"{config.exp_id} is {described} experiment; run `cifar-mlops {config.kind} "
                          f"--exp {config.exp_id}`")


def to_yaml(config: Config) -> str:
    """The resolved config as YAML: what is logged with every run and can be read back. A `track` section
    left at its defaults is left out: the text (and its digest, which finds an ablation's finished runs) is
    the same as before the section existed."""
    default = isinstance(config, ExperimentConfig) and config.track == TrackConfig()
    return yaml.safe_dump(config.model_dump(mode="json", exclude={"track"} if default else None), sort_keys=False)


def from_yaml(text: str, where: str) -> Config:
    """A config logged by `to_yaml`, read back and validated (`where` names it in the error)."""
    try:
        fields = _load_yaml(text)
        schema = EnsembleConfig if isinstance(fields, dict) and fields.get("kind") == "ensemble" else ExperimentConfig
        return schema.model_validate(fields)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML ({first_line(err)})") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{where} is not a config this version can read ({key}: {first['msg']})") from None


# ---------------------------------------------------------------------------
# The studies' check-mark tables (printed by `experiments`, rendered by `report`)

STUDY_TITLES = {
    "A": "Study A: MobileNetV2 (1.x, 2.x) and DenseNet-121 (3.x); 3.2 soft-votes 2.4 and 3.1",
    "B": "Study B: a small CNN from scratch (no known architecture, 5,000/5,000 random split)",
}


def enhancement_matrix(iterations: list[Config], rows: list[str],
                       catalogue: dict[str, dict[str, Any]]) -> tuple[list[str], list[tuple[str, list[bool]]]]:
    """A study's check-mark table: (trainable iteration ids, [(enhancement label, [used by each?])])."""
    trainable = [c for c in iterations if c.kind == "train"]
    return ([c.exp_id for c in trainable],
            [(catalogue[row]["label"], [row in c.enhancements for c in trainable]) for row in rows])


def study_enhancement_matrix(study: str, resolved: list[Config] | None = None) -> tuple[list[str], list[tuple[str, list[bool]]]]:
    """`enhancement_matrix` for one study, from the whole catalogue."""
    resolved = resolved if resolved is not None else [resolve(e) for e in list_experiments()]
    catalogue = load_enhancements()
    rows = [name for name, entry in catalogue.items() if study in entry.get("studies", [])]
    return enhancement_matrix([c for c in resolved if c.study == study], rows, catalogue)
