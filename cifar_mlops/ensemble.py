"""Soft voting over registered model versions (experiment 3.2 and any other `kind: ensemble` file).

Members are looked up in the registry (newest version of an experiment id, an
alias, or a pinned version), checked against the image contract (raw uint8
(-1, 32, 32, 3) in, (-1, classes) probabilities out), each loaded once and fed
the same raw images in batches. The ensemble is evaluated like a training run
(same splits, same metrics), tracked in `cifar10-ablation` and registered as a
version of `cifar10-ensemble`: an MLflow pyfunc carrying copies of its members.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cifar_mlops import data, evaluation, tracking
from cifar_mlops.config import EnsembleConfig
from cifar_mlops.progress import log

SPLITS = ("train", "val", "test")


class EnsembleFailed(RuntimeError):
    """The ensemble cannot be built from these members or this data; the message says why."""


@dataclass(frozen=True)
class Member:
    version: tracking.RegisteredVersion
    num_classes: int
    weight: float


def normalized(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def soft_vote(probabilities: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of the members' class probabilities (equal weights by default)."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])
    w = normalized(np.ones(len(stacked)) if weights is None else weights)
    return np.tensordot(w, stacked, axes=1).astype(np.float32)


def _softmax(theta: np.ndarray) -> np.ndarray:
    e = np.exp(theta - theta.max())
    return e / e.sum()


def _val_loss(w: np.ndarray, stacked: np.ndarray, y: np.ndarray) -> float:
    p_true = np.tensordot(w, stacked[:, np.arange(len(y)), y], axes=1)
    return float(-np.mean(np.log(np.clip(p_true, 1e-7, None))))


def _accuracy(w: np.ndarray, stacked: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.tensordot(w, stacked, axes=1).argmax(axis=1) == y))


def fit_weights(val_probabilities: Sequence[np.ndarray], y_val: np.ndarray,
                initial: Sequence[float] | None = None) -> tuple[np.ndarray, bool]:
    """Member weights minimising validation log-loss; (weights, fitted?).

    Weights are softmax(theta), so they stay positive and sum to 1; the search
    (L-BFGS-B, analytic gradient) starts from `initial` (equal weights by
    default). The fitted weights are kept only if they lower the validation
    log-loss without lowering validation accuracy; otherwise `initial` is
    returned unchanged, so fitting never scores worse on validation.
    """
    from scipy.optimize import minimize

    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in val_probabilities])
    y = np.asarray(y_val)
    start = normalized(np.ones(len(stacked)) if initial is None else initial)
    p_members = stacked[:, np.arange(len(y)), y]  # (members, images): each member's probability of the truth

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = _softmax(theta)
        p_true = np.clip(w @ p_members, 1e-7, None)
        grad_w = -np.mean(p_members / p_true, axis=1)
        return float(-np.mean(np.log(p_true))), w * (grad_w - w @ grad_w)

    result = minimize(objective, np.log(np.clip(start, 1e-6, None)), jac=True, method="L-BFGS-B")
    fitted = _softmax(result.x)
    better_loss = _val_loss(fitted, stacked, y) < _val_loss(start, stacked, y) - 1e-9
    if better_loss and _accuracy(fitted, stacked, y) >= _accuracy(start, stacked, y):
        return fitted, True
    return start, False


def resolve_members(config: EnsembleConfig) -> list[Member]:
    """Find each member in the registry and check the image contract; raise RegistryError/EnsembleFailed."""
    members = []
    for spec in config.members:
        version = tracking.find_version(spec.registered_model, exp_id=spec.exp_id, alias=spec.alias,
                                        version=spec.version)
        members.append(Member(version, tracking.image_contract(version), spec.weight))
    classes = {m.num_classes for m in members}
    if len(classes) > 1:
        described = ", ".join(f"{m.version} outputs {m.num_classes}" for m in members)
        raise EnsembleFailed(f"members disagree on the number of classes ({described})")
    if sum(m.weight for m in members) <= 0:
        raise EnsembleFailed("member weights sum to 0; give at least one member a positive weight")
    return members


def predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """A loaded member's probabilities for raw uint8 images, `batch_size` images at a time."""
    import keras

    keras.utils.disable_interactive_logging()  # no progress bar per batch
    try:
        with warnings.catch_warnings():  # Keras: "The structure of `inputs` doesn't match" (harmless)
            warnings.simplefilter("ignore", UserWarning)
            chunks = [np.asarray(model.predict(images[i:i + batch_size]), dtype=np.float32)
                      for i in range(0, len(images), batch_size)]
    finally:
        keras.utils.enable_interactive_logging()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def build(config: EnsembleConfig, *, register: bool = True, splits: data.Splits | None = None,
          members: list[Member] | None = None) -> dict[str, float]:
    """Resolve, evaluate, track and (if `register`) register ensemble `config`; return its metrics.

    `members` (from `resolve_members(config)`) skips the registry look-up.
    """
    if config.kind != "ensemble":
        raise EnsembleFailed(f"{config.exp_id} is not an ensemble; train it with `cifar-mlops train --exp {config.exp_id}`")
    if members is None:
        members = resolve_members(config)  # before the run: an unresolvable member leaves no run behind
    log(f"{config.exp_id}: members " + ", ".join(f"{m.version} (exp {m.version.exp_id})" for m in members))
    with tracking.TrainingRun(config) as run:
        log(f"{config.exp_id}: tracking {run.url_hint}")
        splits = run.load_data(config.data, splits)
        if members[0].num_classes != splits.num_classes:
            raise EnsembleFailed(f"members output {members[0].num_classes} classes but the data has {splits.num_classes}")
        tracking.log_members([m.version for m in members], [m.weight for m in members])

        xy = {"train": (splits.x_train, splits.y_train), "val": (splits.x_val, splits.y_val),
              "test": (splits.x_test, splits.y_test)}
        probabilities: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        for i, member in enumerate(members):
            log(f"member {i}: loading {member.version} and predicting train, val and test")
            model = tracking.load_model(member.version.uri)  # each member is loaded once
            for split, (x, _) in xy.items():
                probabilities[split].append(predict(model, x, config.batch_size))
            del model

        weights = normalized([m.weight for m in members])
        fitted = False
        if config.fit_weights:
            weights, fitted = fit_weights(probabilities["val"], splits.y_val, weights)
            log(f"weights fitted on val: {', '.join(f'{w:.3f}' for w in weights)}" if fitted else
                "fitted weights were not better on val; keeping the configured weights")

        metrics: dict[str, float] = {}
        ensemble = {split: soft_vote(probabilities[split], weights) for split in SPLITS}
        for split, (_, y) in xy.items():
            metrics.update(evaluation.split_metrics(split, y, ensemble[split]))
        for i, member in enumerate(members):
            for split in ("val", "test"):
                own = evaluation.split_metrics(split, xy[split][1], probabilities[split][i])
                metrics.update({f"member_{i}_{key}": value for key, value in own.items()})
            metrics[f"weight_{i}"] = float(weights[i])
        for key in ("accuracy", "f1_macro"):
            best = max(metrics[f"member_{i}_test_{key}"] for i in range(len(members)))
            metrics[f"ensemble_gain_test_{key}"] = metrics[f"test_{key}"] - best
        metrics["weights_fitted"] = float(fitted)

        figure = evaluation.confusion_matrix_figure(splits.y_test, ensemble["test"], splits.class_names,
                                                    f"{config.exp_id}: test confusion matrix")
        report = evaluation.per_class_report(splits.y_test, ensemble["test"], splits.class_names)
        run.log_results(metrics, report, {"confusion_matrix": figure})
        evaluation.close(figure)

        log("logging the ensemble model (members' files copied in)")
        model_uri = tracking.log_ensemble_model([m.version for m in members], list(weights),
                                                splits.num_classes, config.batch_size)
        if register:
            version = run.register(model_uri, metrics)
            tracking.set_version_tags(tracking.registered_model_name(config.family), version, {
                "members": ",".join(str(m.version) for m in members),
                "weights": ",".join(f"{w:.4f}" for w in weights),
            })
            log(f"registered {tracking.registered_model_name(config.family)} version {version}")
        log(" ".join(f"{k}={metrics[k]:.4f}" for k in ("val_accuracy", "test_accuracy", "test_f1_macro",
                                                         "ensemble_gain_test_accuracy")))
        return metrics
