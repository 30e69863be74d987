"""Item 5, accuracy on real images: study B's iterations on the real CIFAR-10 sample, several seeds each.

    .venv/bin/python benchmarks/bench_study_b.py [--exps b0,b1,b2,b3,b4,b5,b6,b7] [--seeds 0,1,2] [--epochs N]

Each run is `cifar-mlops train --exp bX --data-dir SAMPLE --set data.train_size=3336 --set data.val_size=834
--set data.seed=S --set train.seed=S --no-register` in a fresh subprocess (throwaway MLflow store). The sample
is 4,170 real CIFAR-10 training images (data batches; 3,336 train / 834 validation, drawn as the iteration
says: random for b0-b5, stratified for b6-b7) and a 1,000-image test batch drawn from the real training
set: NOT the official test set, and smaller than the study's 5,000 / 5,000 split, so the numbers are not
directly comparable with the published 53.36% -> 66.7% (validation accuracy on 5,000 images).
CPU minutes per run = user + sys CPU time of the subprocess (both cores count), wall minutes beside it.
"""

from __future__ import annotations

import sys

import common

PUBLISHED = {"b0": 0.5336, "b5": 0.667}  # the study's validation accuracy, first and final iteration


def main() -> None:
    common.sample_study_main(__doc__, "study_b", "b0,b1,b2,b3,b4,b5,b6,b7,b8,b9", "0,1,2", PUBLISHED, "published_val")


if __name__ == "__main__":
    sys.exit(main())
