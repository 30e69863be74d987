"""The promotion rule: better candidates take @champion, worse ones are refused with the numbers."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from scipy.stats import binomtest

from cifar_mlops import cli, data
from cifar_mlops import promote as rule
from cifar_mlops.tracking import served
from tests.conftest import TRAINED_REGISTRY, tiny

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("promote")

MODEL = "cifar10-cnn"


@pytest.fixture(scope="module")
def versions(trained_registry: str) -> dict[str, int]:
    """The shared trained registry's cifar10-cnn versions, clearly apart in test accuracy on the same data:
    name (weak, mid, strong) -> version number (conftest.TRAINED_REGISTRY)."""
    return {name: number for number, name in enumerate(TRAINED_REGISTRY, start=1)}


def reset(champion: int | None = None) -> None:
    """Clear every alias and promotion tag, then give @champion to `champion`."""
    client = MlflowClient()
    for alias in client.get_registered_model(MODEL).aliases:
        client.delete_registered_model_alias(MODEL, alias)
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        for key in version.tags:
            if key.startswith(("promotion_", "promoted_")):
                client.delete_model_version_tag(MODEL, str(version.version), key)
    if champion is not None:
        client.set_registered_model_alias(MODEL, "champion", str(champion))


def aliases() -> dict[str, int]:
    return {alias: int(v) for alias, v in MlflowClient().get_registered_model(MODEL).aliases.items()}


def tags(version: int) -> dict[str, str]:
    return MlflowClient().get_model_version(MODEL, str(version)).tags


def promote(*args: str):
    return CliRunner().invoke(cli.main, ["promote", MODEL, *args])


def test_first_candidate_takes_an_empty_alias(versions) -> None:
    reset()
    result = promote("--version", str(versions["weak"]))
    assert result.exit_code == 0, result.stderr
    assert "promoted" in result.stdout and "no @champion yet" in result.stdout
    assert aliases() == {"champion": versions["weak"]}
    assert tags(versions["weak"])["promotion_decision"] == "promoted"


def test_a_better_candidate_is_promoted_and_the_old_champion_becomes_previous(versions) -> None:
    reset(champion=versions["mid"])
    result = promote("--version", str(versions["strong"]), "--min-delta", "0.05")
    assert result.exit_code == 0, result.stderr
    assert aliases() == {"champion": versions["strong"], "previous": versions["mid"]}
    candidate = tags(versions["strong"])
    strong_acc, mid_acc = (float(tags(versions[n])["test_accuracy"]) for n in ("strong", "mid"))
    assert candidate["promotion_decision"] == "promoted"
    assert candidate["promotion_against"] == f"{MODEL}/{versions['mid']}"
    assert float(candidate["promotion_candidate_value"]) == pytest.approx(strong_acc, abs=1e-4)
    assert float(candidate["promotion_holder_value"]) == pytest.approx(mid_acc, abs=1e-4)
    assert float(candidate["promotion_delta"]) == pytest.approx(strong_acc - mid_acc, abs=1e-4)
    assert f"test_accuracy={strong_acc:.4f}" in result.stdout and f"test_accuracy={mid_acc:.4f}" in result.stdout
    assert tags(versions["mid"])["promotion_replaced_by"] == f"{MODEL}/{versions['strong']}"


def test_a_worse_candidate_is_refused_with_the_numbers(versions) -> None:
    reset(champion=versions["mid"])
    result = promote("--version", str(versions["weak"]))
    assert result.exit_code == 0, result.stderr
    weak_acc, mid_acc = (float(tags(versions[n])["test_accuracy"]) for n in ("weak", "mid"))
    assert f"test_accuracy={weak_acc:.4f}" in result.stdout and f"test_accuracy={mid_acc:.4f}" in result.stdout
    assert f"delta {weak_acc - mid_acc:+.4f}" in result.stdout
    assert "decision: refused: test_accuracy is not better" in result.stdout
    assert aliases() == {"champion": versions["mid"]}
    assert tags(versions["weak"])["promotion_decision"] == "refused"
    # too small a gain is refused too, and --force overrides the rule (tagged as forced)
    small = promote("--version", str(versions["strong"]), "--min-delta", "2")
    assert "below min-delta 2" in small.stdout and aliases() == {"champion": versions["mid"]}
    forced = promote("--version", str(versions["weak"]), "--force")
    assert "decision: forced" in forced.stdout
    assert aliases() == {"champion": versions["weak"], "previous": versions["mid"]}
    assert tags(versions["weak"])["promotion_decision"] == "forced"


def test_dry_run_changes_nothing(versions) -> None:
    reset(champion=versions["mid"])
    before = {v: tags(v) for v in versions.values()}
    for args in (["--version", str(versions["strong"])], ["--version", str(versions["weak"]), "--force"]):
        result = promote(*args, "--dry-run")
        assert result.exit_code == 0, result.stderr
        assert "dry run, nothing changed; would be:" in result.stdout
    assert "would be: promoted" in promote("--version", str(versions["strong"]), "--dry-run").stdout
    assert aliases() == {"champion": versions["mid"]}
    assert {v: tags(v) for v in versions.values()} == before
    reset()
    assert "would be: promoted" in promote("--version", str(versions["weak"]), "--dry-run=true").stdout
    assert aliases() == {}


def test_mcnemar_p_value_matches_a_binomial_reference(versions) -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    a = y.copy()
    b = y.copy()
    a[:4] = (y[:4] + 1) % 10  # candidate wrong on 4 images
    b[4:13] = (y[4:13] + 1) % 10  # holder wrong on 9 others
    p, only_a, only_b = rule.mcnemar_exact(y, a, b)
    assert (only_a, only_b) == (9, 4)
    assert p == pytest.approx(binomtest(4, 13, 0.5).pvalue)

    # On the registered models: the same test images, predictions paired image by image.
    reset(champion=versions["weak"])
    decision = rule.decide(MODEL, versions["strong"], alpha=0.05, dry_run=True)
    splits = data.load_splits(tiny("smoke").data)
    predictions = {name: served.load_probabilities(f"models:/{MODEL}/{versions[name]}", 64)(splits.x_test).argmax(1)
                   for name in ("weak", "strong")}
    right_strong, right_weak = predictions["strong"] == splits.y_test, predictions["weak"] == splits.y_test
    b, c = int(np.sum(right_strong & ~right_weak)), int(np.sum(~right_strong & right_weak))
    assert decision.discordant == (b, c) and decision.num_images == len(splits.y_test)
    assert decision.p_value == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue)
    assert decision.promote == (decision.p_value < 0.05)
    result = promote("--version", str(versions["strong"]), "--alpha", "0.05")
    assert f"McNemar exact p={decision.p_value:.4g}" in result.stdout
    assert float(tags(versions["strong"])["promotion_p_value"]) == pytest.approx(decision.p_value, rel=1e-4)


def test_a_version_says_what_it_is_and_a_promotion_appends_why_it_took_the_alias(versions, monkeypatch) -> None:
    import keras

    client = MlflowClient()
    strong, weak = (client.get_model_version(MODEL, str(versions[n])) for n in ("strong", "weak"))
    run = client.get_run(strong.run_id)
    metrics = run.data.metrics
    assert strong.description.startswith("Experiment **smoke-wide**: A second smoke member")
    for line in ("- data: synthetic (NOT CIFAR-10)",
                 f"- test accuracy {metrics['test_accuracy']:.4f}, test F1 (macro) {metrics['test_f1_macro']:.4f}",
                 f"- seed 1, Keras backend {keras.backend.backend()}",
                 f"- run [{run.info.run_id}](http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/"
                 f"{run.info.run_id}?workflowType=machine_learning) in MLflow experiment `cifar10-ablation`"):
        assert line in strong.description.splitlines(), (line, strong.description)

    reset(champion=versions["weak"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    result = promote("--version", str(versions["strong"]), "--alpha", "0.5")
    assert result.exit_code == 0 and aliases() == {"champion": versions["strong"], "previous": versions["weak"]}, \
        result.output
    tagged = tags(versions["strong"])
    assert tagged["promoted_by"] == "alice" and tagged["promoted_from"] == f"{MODEL}/{versions['weak']}"
    assert tagged["promoted_at"] == tagged["promotion_time"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tagged["promoted_at"])
    described = client.get_model_version(MODEL, str(versions["strong"])).description
    before, _, account = described.rpartition("\n\n**Promoted to @champion**")
    assert before == strong.description  # what it is stays; the account is appended
    weak_acc, strong_acc = float(tagged["promotion_holder_value"]), float(tagged["promotion_candidate_value"])
    for line in (f" (promoted) by alice at {tagged['promoted_at']}: test_accuracy "
                 f"{float(tagged['promotion_delta']):+.4f} >= 0 and McNemar p={float(tagged['promotion_p_value']):.4g} < 0.5",
                 "- rule: test_accuracy better by more than 0 and by at least 0, McNemar's exact test p < 0.5",
                 f"- candidate {MODEL}/{versions['strong']}, exp smoke-wide: test_accuracy {strong_acc:.4f}",
                 f"- incumbent {MODEL}/{versions['weak']}, exp smoke: test_accuracy {weak_acc:.4f}; now @previous",
                 f"- McNemar exact p={float(tagged['promotion_p_value']):.4g} (candidate-only right "
                 f"{tagged['promotion_discordant'].split(',')[0]}, incumbent-only right "
                 f"{tagged['promotion_discordant'].split(',')[1]})"):
        assert line in account.splitlines(), (line, account)
    replaced = client.get_model_version(MODEL, str(versions["weak"])).description
    assert replaced.startswith(weak.description) and replaced.endswith(
        f"**Replaced as @champion** by {MODEL}/{versions['strong']} (alice at {tagged['promoted_at']}); now @previous")

    shown = CliRunner().invoke(cli.main, ["models", MODEL, "--version", str(versions["strong"])])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith(f"{MODEL}/{versions['strong']} @champion\n")
    assert f"#/models/{MODEL}/versions/{versions['strong']}?workflowType=machine_learning" in shown.stdout
    assert described in shown.stdout
    assert re.search(r"^promoted_by\s+alice$", shown.stdout, re.M)
    assert re.search(rf"^promoted_from\s+{MODEL}/{versions['weak']}$", shown.stdout, re.M)
    alone = CliRunner().invoke(cli.main, ["models", "--version", "1"])
    assert alone.exit_code != 0 and "--version N goes with exactly one MODEL" in alone.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cifar10-nope", "--version", "1"], "unknown registered model 'cifar10-nope' (registered: cifar10-cnn)"),
        ([MODEL, "--version", "99"], "cifar10-cnn has no version 99 (versions: 1, 2, 3)"),
        ([MODEL, "--version", "1", "--alias", "previous"], "@previous is set by promotion itself"),
        ([MODEL, "--version", "1", "--alpha", "2"], "--alpha must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(versions, args, message) -> None:
    reset(champion=versions["mid"])
    result = CliRunner().invoke(cli.main, ["promote", *args])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert aliases() == {"champion": versions["mid"]}
