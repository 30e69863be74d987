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

import argparse
import sys

import common

PUBLISHED = {"b0": 0.5336, "b5": 0.667}  # the study's validation accuracy, first and final iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exps", default="b0,b1,b2,b3,b4,b5,b6,b7,b8,b9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=0, help="0: each iteration's own train.epochs")
    parser.add_argument("--data-dir", default=str(common.SAMPLE_DIR))
    parser.add_argument("--merge", action="store_true",
                        help="keep results/study_b.json runs (exp, seed) not rerun (build the table in several goes)")
    parser.add_argument("--results", default="study_b",
                        help="results/NAME.json to write (another name keeps study_b.json as it is)")
    args = parser.parse_args()

    common.sample_study(args.results, args.exps.split(","), [int(x) for x in args.seeds.split(",")], args.epochs,
                        args.data_dir, args.merge, PUBLISHED, "published val %")

if __name__ == "__main__":
    sys.exit(main())
