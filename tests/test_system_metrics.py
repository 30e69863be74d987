"""MLflow's own system metrics on every training run (`track.system_metrics_interval`), and off when set to 0."""

from __future__ import annotations

import os

from mlflow import MlflowClient

from cifar_mlops import config as cfg
from cifar_mlops.tracking import runs
from cifar_mlops.train import train
from tests.conftest import tiny


def test_a_training_run_carries_system_metrics_at_the_configured_interval_and_none_when_off(store) -> None:
    client = MlflowClient()
    train(tiny("smoke", train__epochs=3, track__system_metrics_interval=0.5), register=False)
    train(tiny("smoke", track__system_metrics_interval=0), register=False)
    off, on = client.search_runs(["1"], order_by=["attributes.start_time DESC"])
    assert on.data.params["track.system_metrics_interval"] == "0.5"
    history = client.get_metric_history(on.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and [m.step for m in history] == list(range(len(history)))
    assert all(0 <= m.value <= 100 * os.cpu_count() for m in history)
    assert on.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert not [key for key in off.data.metrics if key.startswith("system/")]
    assert "system_metrics_interval: 0.0" in runs.run_text_artifact(off.info.run_id, "config.yaml")


def test_a_config_at_the_default_interval_reads_as_before_the_setting_existed() -> None:
    config = tiny("smoke")
    text = cfg.to_yaml(config)
    assert "track" not in text  # the same text, so the same digest (an ablation's finished runs are found again)
    assert cfg.from_yaml(text, "test") == config
    changed = tiny("smoke", track__system_metrics_interval=2)
    assert cfg.from_yaml(cfg.to_yaml(changed), "test").track.system_metrics_interval == 2
