"""Scores and plots from class probabilities: shared by training and ensembles."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, log_loss

matplotlib.use("Agg")  # files only: no screen needed
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

TEST_PREDICTIONS = "test_predictions.csv"


def split_metrics(split: str, y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """`{split}_accuracy`, `{split}_f1_macro` and `{split}_loss` (cross-entropy) of one split."""
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(probabilities.shape[1]))
    return {
        f"{split}_accuracy": float(accuracy_score(y_true, y_pred)),
        f"{split}_f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        f"{split}_loss": float(log_loss(y_true, np.clip(probabilities, 1e-7, 1.0), labels=labels)),
    }


def evaluate(splits, probabilities: dict[str, np.ndarray], exp_id: str) -> tuple[dict[str, float], dict[str, str],
                                                                                  dict[str, Figure]]:
    """What every evaluated run logs, from its probabilities per split: the metrics of each split,
    the per-class report, the confusion matrix and the predicted label of each image of the test split
    (`test_predictions.csv`: test_index in the source's test set, label, predicted; paired tests across
    runs compare these image by image)."""
    metrics: dict[str, float] = {}
    for split, (_, y) in splits.by_split().items():
        metrics.update(split_metrics(split, y, probabilities[split]))
    predicted = pd.DataFrame({"test_index": splits.test_indices, "label": splits.y_test,
                              "predicted": probabilities["test"].argmax(axis=1)})
    texts = {"classification_report.txt": per_class_report(splits.y_test, probabilities["test"], splits.class_names),
             TEST_PREDICTIONS: predicted.to_csv(index=False)}
    figures = {"confusion_matrix": confusion_matrix_figure(splits.y_test, probabilities["test"], splits.class_names,
                                                           f"{exp_id}: test confusion matrix")}
    return metrics, texts, figures


def per_class_report(y_true: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...]) -> str:
    return classification_report(
        y_true, probabilities.argmax(axis=1), labels=list(range(len(class_names))),
        target_names=list(class_names), digits=4, zero_division=0,
    )


def confusion_matrix_figure(y_true: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...],
                            title: str) -> Figure:
    matrix = confusion_matrix(y_true, probabilities.argmax(axis=1), labels=list(range(len(class_names))))
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true",
             title=title)
    axes.set_xticklabels(class_names, rotation=45, ha="right")
    axes.set_yticklabels(class_names)
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center", fontsize=7,
                  color="white" if count > matrix.max() / 2 else "black")
    figure.tight_layout()
    return figure


def learning_curves_figure(history: dict[str, list[float]], title: str) -> Figure:
    """Training vs validation accuracy and loss per epoch (Keras history keys)."""
    figure, (acc_axes, loss_axes) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history.get("loss", [])) + 1)
    for axes, key in ((acc_axes, "accuracy"), (loss_axes, "loss")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            if f"{prefix}{key}" in history:
                axes.plot(epochs, history[f"{prefix}{key}"], marker="o", label=label)
        axes.set(xlabel="epoch", ylabel=key, title=f"{title}: {key}")
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def close(figures: dict[str, Figure]) -> None:
    for figure in figures.values():
        plt.close(figure)
