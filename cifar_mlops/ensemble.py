"""Soft voting over registered model versions (experiment 3.2 and any other `kind: ensemble` file).

Members are looked up in the registry (newest version of an experiment id, an
alias, or a pinned version), checked against the image contract (raw uint8
(-1, 32, 32, 3) in, (-1, classes) probabilities out), each loaded once and fed
the same raw images in batches. The ensemble is evaluated like a training run
(same splits, same metrics), tracked in `cifar10-ablation` and registered as a
version of `cifar10-ensemble`: an MLflow pyfunc carrying copies of its members.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cifar_mlops import data, evaluation
from cifar_mlops.config import EnsembleConfig, check_kind
from cifar_mlops.errors import UserError
from cifar_mlops.progress import log
from cifar_mlops.tracking import registry, runs, served
from cifar_mlops.tracking.image_model import normalized, soft_vote
from cifar_mlops.train import tracked_splits


class EnsembleFailed(UserError):
    """The ensemble cannot be built from these members or this data; the message says why."""

    exit_code = 2  # its members are its input


@dataclass(frozen=True)
class Member:
    version: registry.RegisteredVersion
    num_classes: int
    weight: float


def _val_scores(w: np.ndarray, stacked: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(log-loss, accuracy) of the vote weighted by `w`, computed as the ensemble's run logs `val_loss` and
    `val_accuracy` (float32 votes; sklearn's log_loss over every class, accuracy_score)."""
    scores = evaluation.split_metrics("val", y, soft_vote(list(stacked), w))
    return scores["val_loss"], scores["val_accuracy"]


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
    from scipy.special import softmax

    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in val_probabilities])
    y = np.asarray(y_val)
    start = normalized(np.ones(len(stacked)) if initial is None else initial)
    p_members = stacked[:, np.arange(len(y)), y]  # (members, images): each member's probability of the truth

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(theta)
        p_true = np.clip(w @ p_members, 1e-7, None)
        grad_w = -np.mean(p_members / p_true, axis=1)
        return float(-np.mean(np.log(p_true))), w * (grad_w - w @ grad_w)

    result = minimize(objective, np.log(np.clip(start, 1e-6, None)), jac=True, method="L-BFGS-B")
    fitted = softmax(result.x)
    (fitted_loss, fitted_accuracy), (start_loss, start_accuracy) = (_val_scores(w, stacked, y) for w in (fitted, start))
    if fitted_loss < start_loss - 1e-9 and fitted_accuracy >= start_accuracy:
        return fitted, True
    return start, False


def resolve_members(config: EnsembleConfig) -> list[Member]:
    """Find each member in the registry and check the image contract; raise RegistryError/EnsembleFailed."""
    members = []
    for spec in config.members:
        version = registry.find_version(spec.registered_model, exp_id=spec.exp_id, alias=spec.alias,
                                        version=spec.version)
        members.append(Member(version, served.image_contract(version), spec.weight))
    classes = {m.num_classes for m in members}
    if len(classes) > 1:
        described = ", ".join(f"{m.version} outputs {m.num_classes}" for m in members)
        raise EnsembleFailed(f"members disagree on the number of classes ({described})")
    if sum(m.weight for m in members) <= 0:
        raise EnsembleFailed("member weights sum to 0; give at least one member a positive weight")
    return members


def build(config: EnsembleConfig, *, register: bool = True, splits: data.Splits | None = None) -> dict[str, float]:
    """Resolve, evaluate, track and (if `register`) register ensemble `config`; return its metrics."""
    check_kind(config, "ensemble")
    if register:  # a user who may not register learns it before anything is loaded or tracked
        registry.check_may_register(config.family, runs.ABLATION_EXPERIMENT)
    members = resolve_members(config)  # before the run: an unresolvable member leaves no run behind
    log(f"{config.exp_id}: members " + ", ".join(f"{m.version} (exp {m.version.exp_id})" for m in members))
    with runs.TrainingRun(config) as run:
        log(f"{config.exp_id}: tracking {run.url_hint}")
        splits = tracked_splits(run, config.data, splits)
        if members[0].num_classes != splits.num_classes:
            raise EnsembleFailed(f"members output {members[0].num_classes} classes but the data has {splits.num_classes}")
        run.log(params={**{f"member_{i}": f"{m.version} (exp_id {m.version.exp_id})" for i, m in enumerate(members)},
                        **{f"member_{i}_weight": f"{m.weight:g}" for i, m in enumerate(members)}},
                tags={"members": ",".join(str(m.version) for m in members)})

        member_probabilities: dict[str, list[np.ndarray]] = {split: [] for split in splits.by_split()}
        for i, member in enumerate(members):
            log(f"member {i}: loading {member.version} and predicting train, val and test")
            probabilities_of = served.load_probabilities(member.version.uri, config.batch_size)  # loaded once
            for split, (x, _) in splits.by_split().items():
                member_probabilities[split].append(probabilities_of(x))
            del probabilities_of

        weights = normalized([m.weight for m in members])
        fitted = False
        if config.fit_weights:
            weights, fitted = fit_weights(member_probabilities["val"], splits.y_val, weights)
            log(f"weights fitted on val: {', '.join(f'{w:.3f}' for w in weights)}" if fitted else
                "fitted weights were not better on val; keeping the configured weights")

        probabilities = {split: soft_vote(p, weights) for split, p in member_probabilities.items()}
        metrics, texts, figures = evaluation.evaluate(splits, probabilities, config.exp_id)
        for i in range(len(members)):
            for split in ("val", "test"):
                own = evaluation.split_metrics(split, splits.by_split()[split][1], member_probabilities[split][i])
                metrics.update({f"member_{i}_{key}": value for key, value in own.items()})
            metrics[f"weight_{i}"] = float(weights[i])
        for key in ("accuracy", "f1_macro"):
            best = max(metrics[f"member_{i}_test_{key}"] for i in range(len(members)))
            metrics[f"ensemble_gain_test_{key}"] = metrics[f"test_{key}"] - best
        metrics["weights_fitted"] = float(fitted)
        run.log_results(metrics, texts, figures)
        evaluation.close(figures)

        log("logging the ensemble model (members' files copied in)")
        model_uri = served.log_ensemble_model([m.version for m in members], list(weights), splits.class_names,
                                              config.batch_size)
        if register:
            version = run.register(model_uri, metrics, tags={
                "members": ",".join(str(m.version) for m in members),
                "weights": ",".join(f"{w:.4f}" for w in weights)})
            name = registry.registration_name(config.family)
            log(f"registered {name} version {version}: {run.version_link(name, version)}")
        log(" ".join(f"{k}={metrics[k]:.4f}" for k in ("val_accuracy", "test_accuracy", "test_f1_macro",
                                                         "ensemble_gain_test_accuracy")))
        return metrics
