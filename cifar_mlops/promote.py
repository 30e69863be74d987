"""The promotion rule: does a candidate version take an alias (`@champion`) from its current holder?

Both versions predict the same test images: the test split of the candidate's
own run (its logged `config.yaml` data section; `--exp` names an experiment
whose data section to use instead, `--data-dir` relocates real CIFAR-10). The
candidate wins when its metric beats the holder's by more than 0 and by at
least `min_delta` and, when `alpha` is given, McNemar's exact test on the
paired right/wrong predictions has p < alpha. A winner takes the alias, the
old holder gets `previous`; the numbers go to the candidate's version tags
either way (except with `dry_run`, which changes nothing). The version that takes the alias is
tagged `promoted_by`, `promoted_at`, `promoted_from` (the old holder, or `none`) and the account of
the decision is appended to its description (and to the old holder's: what replaced it), where the
UI's version page and `cifar-mlops models MODEL --version N` show it.
"""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import dataclass, field

import numpy as np

from cifar_mlops import data, evaluation
from cifar_mlops.config import ConfigError, DataConfig, from_yaml, resolve
from cifar_mlops.errors import UserError
from cifar_mlops.progress import log
from cifar_mlops.tracking import registry, runs, served
from cifar_mlops.tracking.registry import RegisteredVersion

METRICS = ("test_accuracy", "test_f1_macro", "test_loss")  # test_loss: lower is better
PREVIOUS_ALIAS = "previous"  # the old @champion; the old holder of another alias X becomes @X-previous
COPIED_FROM = "copied_from"  # tag of a served version copied from a candidates model: which version


def previous_alias(alias: str) -> str:
    return PREVIOUS_ALIAS if alias == "champion" else f"{alias}-{PREVIOUS_ALIAS}"


class PromotionError(UserError):
    """A promotion that cannot be decided as asked (bad alias, alpha, metric, or unknown test images)."""

    exit_code = 2


@dataclass
class Decision:
    candidate: RegisteredVersion
    holder: RegisteredVersion | None
    alias: str
    metric: str
    min_delta: float
    alpha: float | None
    promote: bool = False
    forced: bool = False
    dry_run: bool = False
    reason: str = ""
    candidate_value: float | None = None
    holder_value: float | None = None
    delta: float | None = None  # improvement of the candidate (positive = better, also for test_loss)
    p_value: float | None = None
    discordant: tuple[int, int] = (0, 0)  # (candidate right & holder wrong, candidate wrong & holder right)
    num_images: int = 0
    data_description: str = ""
    notes: list[str] = field(default_factory=list)
    served: str = ""  # the model whose alias it is: the candidate's own, or the served model of a candidates model
    promoted_as: RegisteredVersion | None = None  # the candidate's copy in `served`, once promoted from candidates
    when: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # UTC, decided
    by: str = field(default_factory=lambda: promoter())

    @property
    def holds(self) -> bool:
        """Does the holder already stand for the candidate (it, or its copy)?"""
        holder, candidate = self.holder, self.candidate
        return holder is not None and (str(holder) == str(candidate) or holder.tags.get(COPIED_FROM) == str(candidate))

    @property
    def outcome(self) -> str:
        if self.promote:
            return "forced" if self.forced else "promoted"
        return "unchanged" if self.holds else "refused"

    def tags(self) -> dict[str, str]:
        """What is written to the candidate version's tags."""
        tags = {"promotion_alias": self.alias, "promotion_decision": self.outcome, "promotion_reason": self.reason,
                "promotion_metric": self.metric,
                "promotion_against": str(self.holder) if self.holder else "none",
                "promotion_time": self.when}
        for key, value in (("candidate_value", self.candidate_value), ("holder_value", self.holder_value),
                           ("delta", self.delta), ("p_value", self.p_value)):
            if value is not None:
                tags[f"promotion_{key}"] = f"{value:.6g}"
        if self.p_value is not None:
            tags["promotion_discordant"] = f"{self.discordant[0]},{self.discordant[1]}"
        if self.num_images:
            tags["promotion_test_images"] = str(self.num_images)
            tags["promotion_data"] = self.data_description
        return tags

    def lines(self) -> list[str]:
        """The human-readable account printed by the CLI."""
        out = []
        if self.candidate_value is not None:
            out.append(f"candidate {self.candidate} (exp {self.candidate.exp_id}): {self.metric}={self.candidate_value:.4f}")
        if self.holder is not None and self.holder_value is not None:
            out.append(f"@{self.alias} {self.holder} (exp {self.holder.exp_id}): {self.metric}={self.holder_value:.4f}")
        if self.delta is not None:
            line = f"delta {self.delta:+.4f} (min-delta {self.min_delta:g})"
            if self.p_value is not None:
                line += (f", McNemar exact p={self.p_value:.4g} (candidate-only right {self.discordant[0]}, "
                         f"holder-only right {self.discordant[1]}, alpha {self.alpha:g})")
            out.append(line + f" on {self.num_images} test images ({self.data_description})")
        out.extend(self.notes)
        prefix = "dry run, nothing changed; would be: " if self.dry_run else ""
        out.append(f"decision: {prefix}{self.outcome}: {self.reason}")
        if self.promote:
            winner = (f"{self.promoted_as} (a copy of {self.candidate})" if self.promoted_as else
                      f"{self.candidate}" if self.candidate.name == self.served else
                      f"{self.candidate}, copied into {self.served},")
            moved = f"{winner} {'would take' if self.dry_run else 'now holds'} @{self.alias}"
            if self.holder is not None:
                moved += f"; {self.holder} {'would become' if self.dry_run else 'is now'} @{previous_alias(self.alias)}"
            out.append(moved)
        return out


    def promoted_tags(self) -> dict[str, str]:
        """The tags of the version that took the alias: who, when, from which version."""
        return {"promoted_by": self.by, "promoted_at": self.when,
                "promoted_from": str(self.holder) if self.holder else "none"}

    def account(self, winner: RegisteredVersion) -> str:
        """Why `winner` took the alias (markdown, appended to its description)."""
        rule = f"rule: {self.metric} better by more than 0 and by at least {self.min_delta:g}" + (
            f", McNemar's exact test p < {self.alpha:g}" if self.alpha is not None else "")
        lines = [f"**Promoted to @{self.alias}** ({self.outcome}) by {self.by} at {self.when}: {self.reason}", "",
                 f"- {rule}"]
        copied = f" (copy of {self.candidate})" if str(winner) != str(self.candidate) else ""
        if self.candidate_value is not None:
            lines.append(f"- candidate {winner}{copied}, exp {self.candidate.exp_id}: "
                         f"{self.metric} {self.candidate_value:.4f}")
        if self.holder is None:
            lines.append(f"- incumbent: none ({self.served} had no @{self.alias})")
        else:
            value = f": {self.metric} {self.holder_value:.4f}" if self.holder_value is not None else ""
            lines.append(f"- incumbent {self.holder}, exp {self.holder.exp_id}{value}; now "
                         f"@{previous_alias(self.alias)}")
        if self.p_value is not None:
            lines.append(f"- McNemar exact p={self.p_value:.4g} (candidate-only right {self.discordant[0]}, "
                         f"incumbent-only right {self.discordant[1]})")
        if self.num_images:
            lines.append(f"- scored on {self.num_images} test images: {self.data_description}")
        return "\n".join(lines)


def promoter() -> str:
    """Who promotes: the team server's user, else this machine's account (never a password)."""
    name = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not name:
        try:
            name = getpass.getuser()
        except OSError:  # no user name in the environment nor in the password database
            name = "unknown"
    return name


def mcnemar_exact(y_true: np.ndarray, pred_candidate: np.ndarray, pred_holder: np.ndarray) -> tuple[float, int, int]:
    """McNemar's exact test on paired predictions: (p-value, candidate-only right, holder-only right)."""
    from statsmodels.stats.contingency_tables import mcnemar

    from cifar_mlops.ablation_stats import mcnemar_table

    y_true = np.asarray(y_true)
    table = mcnemar_table(np.asarray(pred_candidate) == y_true, np.asarray(pred_holder) == y_true)
    return float(mcnemar(table, exact=True).pvalue), int(table[0, 1]), int(table[1, 0])


def scoring_data_config(candidate: RegisteredVersion, holder: RegisteredVersion | None,
                     exp_id: str | None, data_dir: str | None) -> tuple[DataConfig, str]:
    """The data section whose test split both versions are scored on, and where it came from."""
    if exp_id:
        data_config, origin = resolve(exp_id).data, f"experiment {exp_id}"
    else:
        data_config, origin = None, ""
        for version in (candidate, holder):
            text = runs.run_text_artifact(version.run_id, "config.yaml") if version and version.run_id else None
            if text:
                try:
                    data_config = from_yaml(text, f"config.yaml of the run of {version}").data
                except ConfigError:  # unreadable: as if none
                    continue
                origin = f"the run of {version}"
                break
        if data_config is None:
            raise PromotionError(f"cannot tell which test images {candidate} was evaluated on (its run has no "
                                 "config.yaml); pass --exp <experiment> to use that experiment's data")
    if data_dir:
        data_config = data_config.model_copy(update={"data_dir": data_dir, "source": "cifar10"})
    return data_config, origin


def decide(name: str, version: int, *, alias: str = "champion", metric: str = "test_accuracy",
           min_delta: float = 0.0, alpha: float | None = None, dry_run: bool = False, force: bool = False,
           exp_id: str | None = None, data_dir: str | None = None, batch_size: int = 128) -> Decision:
    """Apply the promotion rule to version `version` of `name` (and act on it unless `dry_run`)."""
    if metric not in METRICS:
        raise PromotionError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if alpha is not None and not 0 < alpha <= 1:
        raise PromotionError(f"--alpha must be in (0, 1], got {alpha}")
    if alias == PREVIOUS_ALIAS or alias.endswith(f"-{PREVIOUS_ALIAS}"):
        raise PromotionError(f"@{PREVIOUS_ALIAS} is set by promotion itself; promote to another alias")
    candidate = registry.find_version(name, version=version)
    served = registry.served_name(name)  # a candidates model's versions compete for its served model's alias
    holder = registry.alias_holder(served, alias) if served == name or registry.exists(served) else None
    decision = Decision(candidate, holder, alias, metric, min_delta, alpha, dry_run=dry_run, served=served)

    if holder is not None and decision.holds:
        decision.reason = f"{candidate} already holds @{alias}" + (f" (as {holder})" if holder.name != name else "")
        return decision
    if holder is None and not force:
        decision.promote = True
        decision.reason = f"{served} has no @{alias} yet: the first candidate takes it"
    else:
        _compare(decision, exp_id, data_dir, batch_size)
        if force and not decision.promote:
            decision.promote = decision.forced = True
            decision.reason = f"--force (the rule said: {decision.reason})"
        elif force:
            decision.reason += " (--force not needed)"
    if not dry_run:
        _act(decision)
    return decision


def _compare(decision: Decision, exp_id: str | None, data_dir: str | None, batch_size: int) -> None:
    candidate, holder = decision.candidate, decision.holder
    data_config, origin = scoring_data_config(candidate, holder, exp_id, data_dir)
    log(f"loading the test images of {origin}")
    splits = data.load_splits(data_config)
    x, y = splits.x_test, splits.y_test
    decision.num_images = len(y)
    decision.data_description = f"{splits.source}, test split of {origin}, fingerprint {splits.fingerprint[:12]}"

    probabilities = {}
    for role, version in (("candidate", candidate), ("holder", holder)):
        if version is None:
            continue
        classes = served.image_contract(version)
        if classes != splits.num_classes:
            raise PromotionError(f"{version} outputs {classes} classes but the test data has {splits.num_classes}")
        log(f"{role} {version}: predicting {len(y)} test images")
        probabilities[role] = served.load_probabilities(version.uri, batch_size)(x)
    split_key = decision.metric.removeprefix("test_")
    value = {role: evaluation.split_metrics("test", y, p)[f"test_{split_key}"] for role, p in probabilities.items()}
    decision.candidate_value = value["candidate"]
    if holder is None:  # only with --force and no holder
        decision.reason = f"no @{decision.alias} to compare against"
        decision.promote = True
        return
    decision.holder_value = value["holder"]
    sign = -1.0 if decision.metric == "test_loss" else 1.0
    decision.delta = sign * (value["candidate"] - value["holder"])
    recorded = holder.tags.get(decision.metric) if decision.metric == "test_accuracy" else None
    if recorded and abs(float(recorded) - decision.holder_value) > 5e-4:
        decision.notes.append(f"note: {holder}'s recorded {decision.metric} is {recorded}; "
                              "it was trained or evaluated on other test images")

    reasons = []
    if decision.delta <= 0:
        reasons.append(f"{decision.metric} is not better ({decision.delta:+.4f})")
    elif decision.delta < decision.min_delta:
        reasons.append(f"the gain {decision.delta:+.4f} is below min-delta {decision.min_delta:g}")
    if decision.alpha is not None:
        decision.p_value, only_candidate, only_holder = mcnemar_exact(
            y, probabilities["candidate"].argmax(1), probabilities["holder"].argmax(1))
        decision.discordant = (only_candidate, only_holder)
        if not decision.p_value < decision.alpha:
            reasons.append(f"McNemar p={decision.p_value:.4g} is not below alpha {decision.alpha:g}")
    decision.promote = not reasons
    decision.reason = "; ".join(reasons) if reasons else (
        f"{decision.metric} {decision.delta:+.4f} >= {decision.min_delta:g}"
        + (f" and McNemar p={decision.p_value:.4g} < {decision.alpha:g}" if decision.alpha is not None else ""))


def _act(decision: Decision) -> None:
    """Move the aliases first, tag after: a refused move (a team server's permissions) leaves no tag behind."""
    candidate, holder = decision.candidate, decision.holder
    if decision.outcome == "unchanged":
        return
    if not decision.promote:
        registry.set_version_tags(candidate.name, candidate.version, decision.tags())
        return
    winner = candidate
    if candidate.name != decision.served:  # from a candidates model: its copy in the served model takes the alias
        winner = registry.copy_version(candidate, decision.served)
        try:
            registry.set_alias(winner, decision.alias)
        except BaseException:
            registry.delete_version(winner)  # no copy is left behind without the alias it was made for
            raise
        decision.promoted_as = winner
    else:
        registry.set_alias(winner, decision.alias)
    if holder is not None:
        registry.set_alias(holder, previous_alias(decision.alias))
        registry.set_version_tags(holder.name, holder.version, {
            "promotion_replaced_by": str(winner), "promotion_replaced_alias": decision.alias})
        registry.append_description(holder.name, holder.version, (
            f"**Replaced as @{decision.alias}** by {winner} ({decision.by} at {decision.when}); "
            f"now @{previous_alias(decision.alias)}"))
    account = decision.account(winner)
    if winner is not candidate:
        registry.set_version_tags(winner.name, winner.version, {**decision.tags(), COPIED_FROM: str(candidate),
                                                                 **decision.promoted_tags()})
        registry.append_description(winner.name, winner.version, account)
        registry.set_version_tags(candidate.name, candidate.version, decision.tags())
    else:
        registry.set_version_tags(candidate.name, candidate.version, {**decision.tags(), **decision.promoted_tags()})
    registry.append_description(candidate.name, candidate.version, account)
