"""Issue 29, study A on real images: its iterations that need no ImageNet weights, trained as catalogued on the
real CIFAR-10 sample, with CPU-minutes, beside the study's published full-data GPU figures.

    .venv/bin/python benchmarks/bench_study_a.py [--exps 1.0,1.1,2.0,2.1,2.2,2.3,2.4,3.0] [--seeds 0] [--merge]

Each run is `cifar-mlops train --exp X --data-dir SAMPLE --set data.train_size=3336 --set data.val_size=834
--set data.seed=S --set train.seed=S --no-register` in a fresh subprocess (throwaway MLflow store): every
setting else is the catalogue's (epochs, batch size, image size, optimizer), BatchNorm statistics recomputed
before each evaluation (train.bn_recompute_images, its default). The sample is 4,170 images of the real
training set (3,336 train / 834 validation) and a 1,000-image test batch also from the real training set: NOT
the official test set. The published figures (2.4: 88.42%, 3.1: 92.34%, 3.2: 93.41% test accuracy) were
trained on all 50,000 images on a GPU, 3.1 from ImageNet weights, which this machine cannot download: they are
not comparable with these and not reproduced here. Per run: the evaluated train accuracy beside the accuracy
Keras reported for the last epoch (the BatchNorm check), CPU minutes = user + sys of the subprocess.
"""

from __future__ import annotations

import sys

import common

PUBLISHED = {"2.4": 0.8842, "3.1": 0.9234, "3.2": 0.9341}  # the study's test accuracy (full CIFAR-10, GPU)


def main() -> None:
    common.sample_study_main(__doc__, "study_a", "1.0,1.1,2.0,2.1,2.2,2.3,2.4,3.0", "0", PUBLISHED, "published_test")


if __name__ == "__main__":
    sys.exit(main())
