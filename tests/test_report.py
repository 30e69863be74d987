"""`cifar-mlops report`: the ablation tables and plots, regenerated from a store of tiny real runs."""

from __future__ import annotations

import io
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from cifar_mlops import cli
from cifar_mlops import config as cfg
from cifar_mlops import report as reporting
from cifar_mlops.tracking import results, runs
from cifar_mlops.train import train
from tests.conftest import SAMPLE_DIR, tiny, use_store

# One worker runs this module: its module fixtures are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("report")

CHROMIUM = Path("/usr/bin/chromium")
SYNTHETIC_B = "Results on synthetic data (NOT CIFAR-10 results)"
SAMPLE_TITLE = "Results on a CIFAR-10 subset/sample (not the official test set)"


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A store with tiny real runs: b0 (2 seeds), b1 twice (same seed), b5, smoke, 3.0, b0 on the real sample
    when present; plus a FAILED b2, a RUNNING b3 and an earlier report run that must all be ignored."""
    folder = tmp_path_factory.mktemp("report-store")
    patch = pytest.MonkeyPatch()
    uri = use_store(folder, patch)

    train(tiny("b0", train__epochs=2))
    train(tiny("b0", train__epochs=2, train__seed=1), register=False)
    train(tiny("b1", train__epochs=1), register=False)
    train(tiny("b1", train__epochs=3))
    train(tiny("b5", train__epochs=3))
    train(tiny("smoke"), register=False)
    train(tiny("3.0"), register=False)
    if SAMPLE_DIR.is_dir():
        train(tiny("b0", data__source="cifar10", data__data_dir=str(SAMPLE_DIR), data__train_size=300,
                   data__val_size=100, data__test_size=100, train__epochs=2), register=False)

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    for exp_id, status in (("b2", "FAILED"), ("b3", None), ("b4", "FINISHED")):
        run = client.create_run(experiment_id, run_name=exp_id,
                                tags={"exp_id": exp_id, "study": "B", "data_source": "synthetic"})
        client.log_metric(run.info.run_id, "val_accuracy", 0.99)
        if exp_id == "b4":  # an earlier report run that carried an exp_id tag: still never a result
            client.set_tag(run.info.run_id, "kind", "report")
        if status:
            client.set_terminated(run.info.run_id, status)
    every_run = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    yield {"uri": uri, "folder": folder, "runs": [r for r in every_run if r.info.status == "FINISHED"
                                                  and r.data.tags.get("kind") != "report"]}
    patch.undo()


def runs_of(filled, exp_id: str, source: str = "synthetic") -> list:
    return [r for r in filled["runs"] if r.data.tags["exp_id"] == exp_id and r.data.tags["data_source"] == source]


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """`### title` -> rows (dicts by header) of the markdown table under it; checks the table's shape."""
    tables: dict[str, list[dict[str, str]]] = {}
    title, lines = None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            title = line[4:]
        if line.startswith("|") and not lines[i - 1].startswith("|"):
            block = []
            for row in lines[i:]:
                if not row.startswith("|"):
                    break
                block.append(row)
            split = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in block]
            assert len({len(r) for r in split}) == 1, f"ragged table {title}: {block}"
            assert all(set(c) <= set("-:") and c for c in split[1]), block[1]
            assert title not in tables, f"two tables titled {title}"
            tables[title] = [dict(zip(split[0], r)) for r in split[2:]]
    return tables


@pytest.fixture(scope="module")
def latest(filled) -> reporting.Report:
    return reporting.build()


def sections_markdown(report: reporting.Report | str) -> dict[str, dict]:
    """Study title -> its tables parsed from the markdown of that section alone."""
    text = report if isinstance(report, str) else reporting.render_markdown(report)
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {part.splitlines()[0]: markdown_tables(part) for part in parts}


def test_every_finished_iteration_appears_once_with_its_improvement(filled, latest) -> None:
    sections = sections_markdown(latest)
    study_b = sections[cfg.STUDY_TITLES["B"]]
    rows = study_b[SYNTHETIC_B]
    assert [r["Iteration"] for r in rows] == ["b0", "b1", "b5"]  # not the FAILED b2, RUNNING b3, report-tagged b4
    by_id = {r["Iteration"]: r for r in rows}
    assert all(r["Data"] == "synthetic (NOT CIFAR-10)" for r in rows)

    b0_val = [r.data.metrics["val_accuracy"] for r in runs_of(filled, "b0")]
    b1_latest = runs_of(filled, "b1")[-1]
    expected = (b1_latest.data.metrics["val_accuracy"] - statistics.mean(b0_val)) * 100
    assert by_id["b1"]["Δ Val acc vs builds on"] == f"{expected:+.2f} pp"
    assert by_id["b1"]["Run"] == b1_latest.info.run_id[:8]
    assert by_id["b1"]["Model version"] == b1_latest.data.tags["registered_version"]
    assert by_id["b1"]["Epochs"] == "3"
    assert by_id["b0"]["Δ Val acc vs builds on"] == "— (first)"
    assert by_id["b5"]["Δ Val acc vs builds on"] == "— (no run of b4)"
    gap = (runs_of(filled, "b5")[0].data.metrics["train_accuracy"] - runs_of(filled, "b5")[0].data.metrics["val_accuracy"])
    assert by_id["b5"]["Gap train−val"] == f"{gap * 100:+.2f} pp"

    # two seeds of b0: mean ± sample std, both runs named
    assert by_id["b0"]["Seeds"] == "2"
    assert by_id["b0"]["Val acc"] == f"{statistics.mean(b0_val) * 100:.2f}% ± {statistics.stdev(b0_val) * 100:.2f}%"
    assert len(by_id["b0"]["Run"].split(", ")) == 2

    # the check-mark tables come from the catalogue
    marks = {r["Enhancement"]: r for r in study_b["Enhancements per iteration (from the catalogue)"]}
    assert marks["Stratified split"]["b6"] == "✔" and marks["Stratified split"]["b5"] == ""
    # b1-b4 change the model, not enhancements: their descriptions say what the empty columns changed
    assert "b1 (on b0): Wider convolutions; b2 (on b1): A third convolution stage;" in reporting.render_markdown(latest)
    study_a = sections[cfg.STUDY_TITLES["A"]]
    a_marks = {r["Enhancement"]: r for r in study_a["Enhancements per iteration (from the catalogue)"]}
    assert a_marks["AdamW"]["2.4"] == "✔" and a_marks["Transfer learning"]["3.1"] == "✔"
    assert list(a_marks["AdamW"]) == ["Enhancement", *[f"{x}" for x in
                                                       ("1.0", "1.1", "2.0", "2.1", "2.2", "2.3", "2.4", "3.0", "3.1")]]

    # study A: our synthetic 3.0, compared against 2.4 (no run), published figures on their own table
    [row_a] = study_a[SYNTHETIC_B]
    assert row_a["Iteration"] == "3.0" and row_a["Model"] == "densenet121"
    assert row_a["Δ Acc test vs builds on"] == "— (no run of 2.4)"
    published = next(rows for title, rows in study_a.items() if title.startswith("Published figures"))
    assert {r["Iteration"]: r["Acc test"] for r in published} == {
        "2.4 (published)": "0.8842", "3.1 (published)": "0.9234", "3.2 (published)": "0.9341"}
    assert not any("published" in r["Iteration"] for r in rows)  # never beside synthetic numbers

    # smoke: another study, still marked synthetic
    [smoke] = sections[reporting.STUDY_HEADINGS["other"]][SYNTHETIC_B]
    assert smoke["Iteration"] == "smoke" and smoke["Data"] == "synthetic (NOT CIFAR-10)"


@pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason=f"real CIFAR-10 sample not found at {SAMPLE_DIR}")
def test_sample_runs_get_their_own_table_with_the_published_figures_beside_them(filled, latest) -> None:
    study_b = sections_markdown(latest)[cfg.STUDY_TITLES["B"]]
    rows = study_b[SAMPLE_TITLE]
    assert [r["Iteration"] for r in rows] == ["b0", "b0 (published)"]
    assert rows[0]["Data"] == "CIFAR-10 subset/sample (not the official test set)"
    assert rows[1]["Val acc"] == "53.36%" and rows[1]["Run"] == "published" and rows[1]["Data"] == "published"
    assert [r["Iteration"] for r in study_b[SYNTHETIC_B]] == ["b0", "b1", "b5"]  # the sample b0 is not averaged in


def test_best_picks_the_highest_validation_accuracy(filled, latest) -> None:
    best = reporting.build(selection="best")
    b1_runs = runs_of(filled, "b1")
    top = max(b1_runs, key=lambda r: (r.data.metrics["val_accuracy"], r.info.start_time))
    rows = {r["Iteration"]: r for r in sections_markdown(best)[cfg.STUDY_TITLES["B"]][SYNTHETIC_B]}
    assert rows["b1"]["Run"] == top.info.run_id[:8]
    assert any("Selection (best)" in line for line in best.header)
    assert any("Selection (latest)" in line for line in latest.header)


def search_runs_frame(rows: list[dict]) -> pd.DataFrame:
    """Runs as `mlflow.search_runs` returns them: start/end as UTC timestamps, `tags.*`, `params.*`, `metrics.*`."""
    frame = pd.DataFrame(rows)
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], unit="ms", utc=True)
    return frame


def test_improvement_follows_the_catalogue_parent_in_study_a() -> None:
    """3.1 and 3.0 over 2.4, 3.2 over 3.1, as the catalogue declares; published rows beside ours."""
    def run(exp_id: str, accuracy: float, start: int, seed: str = "0", val: float = 0.5) -> dict:
        return {"run_id": f"{exp_id}-{start}".ljust(32, "0"), "status": "FINISHED", "start_time": start,
                "end_time": start + 60_000, "tags.exp_id": exp_id, "tags.data_source": "cifar10",
                "params.train.seed": seed, "metrics.test_accuracy": accuracy, "metrics.train_accuracy": 0.99,
                "metrics.val_accuracy": val, "metrics.epochs_run": 30.0}
    catalogue = {c: cfg.resolve(c) for c in cfg.list_experiments()}
    frame = search_runs_frame([run("2.4", 0.80, 1), run("2.4", 0.84, 2, seed="1"), run("3.0", 0.70, 3),
                               run("3.1", 0.90, 4), run("3.2", 0.93, 5), run("3.2", 0.10, 0, val=0.9)])
    rows = reporting.build_rows(frame, "latest", catalogue)
    table = reporting._results_table("A", "cifar10", rows, reporting.published_rows("A", catalogue), "latest")
    cells = table.frame.set_index("Iteration")
    assert list(cells.index) == ["2.4", "2.4 (published)", "3.0", "3.1", "3.1 (published)", "3.2", "3.2 (published)"]
    assert table.published == [False, True, False, False, True, False, True]
    delta = "Δ Acc test vs builds on"
    assert cells.loc["2.4", delta] == "— (no run of 2.3)" and cells.loc["2.4", "Acc test"] == "0.8200 ± 0.0283"
    assert cells.loc["2.4", "Seeds"] == "2" and cells.loc["2.4", "Run"] == "2.4-1000, 2.4-2000"  # seeds ascending
    assert cells.loc["3.0", delta] == "-0.1200" and cells.loc["3.1", delta] == "+0.0800"
    assert cells.loc["3.2", delta] == "+0.0300"  # the latest 3.2, not the older one
    assert cells.loc["3.2 (published)", "Acc test"] == "0.9341" and cells.loc["3.2 (published)", delta] == ""
    assert cells.loc["2.4", "Wall time"] == "1 min 00 s" and cells.loc["2.4", "Data"] == "CIFAR-10"
    ours = table.records[~table.records["published"]].set_index("exp_id")
    assert ours.loc["3.2", "improvement_test_accuracy"] == pytest.approx(0.03)
    assert ours.loc["3.1", "improvement_test_accuracy"] == pytest.approx(0.08)
    assert ours.loc["2.4", "test_accuracy_std"] == pytest.approx(statistics.stdev([0.80, 0.84]))  # sample std
    assert ours.loc["2.4", "seeds"] == "0;1" and ours.loc["2.4", "n_seeds"] == 2

    # --best: the older 3.2 run has the higher val_accuracy
    best = reporting.build_rows(frame, "best", catalogue).set_index("exp_id")
    assert best.loc["3.2", "test_accuracy"] == pytest.approx(0.10)
    assert best.loc["3.2", "run_ids"] == [run("3.2", 0.10, 0)["run_id"]]


def test_finished_result_runs_is_the_search_runs_frame_without_failed_running_or_report_runs(filled) -> None:
    frame = results.finished_result_runs(runs.ABLATION_EXPERIMENT)
    assert set(frame["run_id"]) == {r.info.run_id for r in filled["runs"]}  # not b2 (FAILED), b3, b4 (report)
    assert len(frame) == len(filled["runs"]) and frame["start_time"].is_monotonic_decreasing  # newest first
    assert {"metrics.val_accuracy", "params.train.seed", "tags.exp_id", "tags.data_source"} <= set(frame.columns)
    assert set(frame["status"]) == {"FINISHED"}


def test_published_figures_are_metadata_of_their_own_experiment_file(filled, latest, tmp_path, monkeypatch) -> None:
    assert cfg.resolve("b5").published.values() == {"val_accuracy": 0.667, "train_accuracy": 0.9596}
    assert cfg.resolve("b6").published is None  # b6 extends b5: published figures are not inherited
    for exp_id in ("2.4", "3.2", "b5"):  # not training settings: never params
        assert not any(key.startswith("published") for key in cfg.resolve(exp_id).flat_params())
    [b5_run] = runs_of(filled, "b5")
    assert not any(key.startswith("published") for key in b5_run.data.params)
    with pytest.raises(cfg.ConfigError, match=r"--set published.test_accuracy: experiment metadata cannot be"):
        cfg.resolve("2.4", {"published.test_accuracy": 0.99})

    # the report's published rows are the experiment files' blocks: study A's in a table of their own (no
    # real-data run of it), study B's b0 beside our b0 on the real sample (b5 has no run there to stand by)
    frame = reporting.csv_frame(latest)
    published = frame[frame["published"]].set_index("exp_id")
    assert published.loc["2.4", "test_f1_macro"] == 0.8874 and published.loc["b0", "val_accuracy"] == 0.5336
    assert sorted(published.index) == ["2.4", "3.1", "3.2", "b0", *([] if SAMPLE_DIR.is_dir() else ["b5"])]

    # validated like every other key, naming the file
    folder = tmp_path / "experiments"
    shutil.copytree(cfg.experiments_dir(), folder)
    monkeypatch.setenv("CIFAR_MLOPS_EXPERIMENTS", str(folder))
    text = (folder / "b0.yaml").read_text()
    for block, message in (
            ("{test_acc: 0.5}", "experiments/b0.yaml: published.test_acc: unknown key; known keys here: note, "),
            ("{val_accuracy: 53.36}", "experiments/b0.yaml: published.val_accuracy: Input should be less than or "
                                      "equal to 1"),
            ("{note: no figures}", "experiments/b0.yaml: published: give at least one of train_accuracy")):
        (folder / "b0.yaml").write_text(re.sub(r"(?ms)^published:.*", f"published: {block}\n", text))
        with pytest.raises(cfg.ConfigError) as caught:
            cfg.resolve("b0")
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_csv_parses_with_one_row_per_table_row(filled, latest) -> None:
    frame = pd.read_csv(io.StringIO(reporting.render_csv(latest)))
    ours = frame[~frame["published"]]
    synthetic_b = ours[(ours["study"] == "B") & (ours["data_source"] == "synthetic")]
    assert sorted(synthetic_b["exp_id"]) == ["b0", "b1", "b5"]
    b1 = synthetic_b.set_index("exp_id").loc["b1"]
    assert b1["run_ids"] == runs_of(filled, "b1")[-1].info.run_id
    assert b1["val_accuracy"] == pytest.approx(runs_of(filled, "b1")[-1].data.metrics["val_accuracy"])
    assert frame[frame["published"] & (frame["exp_id"] == "3.2")]["test_accuracy"].iloc[0] == pytest.approx(0.9341)
    assert set(ours["data_source"]) <= {"synthetic", "cifar10-partial"}


@pytest.mark.requires_service(available=CHROMIUM.exists(),  # skips on a laptop without it, fails in CI
                              reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
def test_html_opens_in_headless_chromium_with_tables_and_plots(filled, latest, tmp_path) -> None:
    from PIL import Image

    page = tmp_path / "report.html"
    reporting.write(latest, "html", page)
    text = page.read_text()
    assert "<script" not in text and "http" not in text.replace(filled["uri"], "")  # self-contained
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table>") == len(latest.tables) >= 5
    assert dom.stdout.count('src="data:image/png;base64,') == len(latest.figures) >= 1
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console

    shot = tmp_path / "shot.png"
    result = subprocess.run([str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1200,4000",
                             "--hide-scrollbars", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1_000_000)
    assert image.size == (1200, 4000) and len(colours) > 200  # text, table shading and a plot, not a blank page
    pixels = {c for _, c in colours}
    plotted = [c for c in pixels if abs(c[0] - 31) < 25 and abs(c[1] - 119) < 25 and abs(c[2] - 180) < 25]
    assert plotted, "matplotlib's blue training curve is not on the screenshot"


def test_html_escapes_every_value_and_marks_published_rows_and_synthetic_notes() -> None:
    frame = pd.DataFrame({"Iteration <i>": ["b0", "2.4"], "Acc test": ["✔", "88.4 & 'x'"]})
    table = reporting.Table("Results <on> synthetic", frame, pd.DataFrame({"published": [False, True]}),
                            note="synthetic (NOT CIFAR-10)")
    figure = reporting.Figure("curves", "b5 <curves>", b"\x89PNG")
    page = reporting.render_html(reporting.Report("A & B", ["one <line>"], [
        reporting.Section("Study <B>", [table, reporting.Table("Empty", frame.iloc[:0], pd.DataFrame()), figure,
                                        "No run of `b5` <yet>."])], "cifar10-ablation", "latest"))
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</body></html>") and "<script" not in page
    assert "<title>A &amp; B</title>" in page and "<li>one &lt;line&gt;</li>" in page
    assert "<h2>Study &lt;B&gt;</h2>" in page and '<p class="note synthetic">synthetic (NOT CIFAR-10)</p>' in page
    assert "<th>Iteration &lt;i&gt;</th>" in page and '<tr><td>b0</td><td class="mark">✔</td></tr>' in page
    assert '<tr class="published"><td>2.4</td><td>88.4 &amp; &#39;x&#39;</td></tr>' in page
    assert page.count("<table>") == 1 and "<h3>Empty</h3>" in page  # a table without rows: its title only
    assert '<img alt="b5 &lt;curves&gt;" src="data:image/png;base64,iVBORw==">' in page
    assert '<p class="note">No run of `b5` &lt;yet&gt;.</p>' in page


def test_markdown_writes_its_plots_beside_it(filled, latest, tmp_path) -> None:
    written = reporting.write(latest, "markdown", tmp_path / "ablation.md")
    text = (tmp_path / "ablation.md").read_text()
    pngs = [p for p in written if p.suffix == ".png"]
    assert pngs and all(p.read_bytes().startswith(b"\x89PNG") and f"]({p.name})" in text for p in pngs)
    assert any("b5_accuracy_synthetic" in p.name for p in pngs)


def test_cli_report_is_logged_as_a_report_run_that_is_never_a_result(filled, tmp_path) -> None:
    before = reporting.build()
    out = tmp_path / "r.html"
    result = CliRunner().invoke(cli.main, ["report", "--format", "html", "--out", str(out), "--best"])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    client = MlflowClient()
    reports = client.get_experiment_by_name(results.REPORT_EXPERIMENT)
    [run] = client.search_runs([reports.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "report"
    assert run.data.tags["selection"] == "best" and run.data.tags["report_of_experiment"] == "cifar10-ablation"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "report.csv"} <= names
    assert any(n.startswith("report_b5_accuracy") and n.endswith(".png") for n in names)
    # The run's page shows the report's text and tables (its description), pointing to the figures
    described = run.data.tags[runs.DESCRIPTION_TAG]
    study_b = cfg.STUDY_TITLES["B"]
    assert described.startswith(f"# {before.title}") and f"## {study_b}" in described and "![" not in described
    assert "b5" in described.split(f"## {study_b}", 1)[1] and len(described) <= runs.TAG_LIMIT
    assert described.endswith(("report.html in this run's artifacts.", "the whole is report.md)"))

    # `mlflow run -e report --experiment-name cifar10-ablation`: the adopted run lands among the results
    ablation = client.get_experiment_by_name(runs.ABLATION_EXPERIMENT).experiment_id
    adopted = client.create_run(ablation, tags={"exp_id": "b6"}).info.run_id
    os.environ["MLFLOW_RUN_ID"] = adopted
    try:
        run_id, experiment = reporting.log(before)
    finally:
        del os.environ["MLFLOW_RUN_ID"]
    assert run_id == adopted and experiment == runs.ABLATION_EXPERIMENT
    assert client.get_run(adopted).info.status == "FINISHED"
    after = reporting.build()
    assert reporting.render_csv(after).count("\n") == reporting.render_csv(before).count("\n")
    assert "b6" not in set(reporting.csv_frame(after)["exp_id"])


def test_unknown_experiment_is_one_line_and_nonzero(filled) -> None:
    result = CliRunner().invoke(cli.main, ["report", "--experiment", "nope", "--log=false"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no MLflow experiment 'nope'" in result.output


def test_markdown_to_stdout_without_logging(filled) -> None:
    result = CliRunner().invoke(cli.main, ["report", "--log=false"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# CIFAR-10 ablation report")
    sections = sections_markdown(result.stdout)
    assert cfg.STUDY_TITLES["B"] in sections and SYNTHETIC_B in sections[cfg.STUDY_TITLES["B"]]
    assert "plot(s) not written" not in result.stdout and "plot(s) not written" in result.stderr
