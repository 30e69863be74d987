"""Child of bench_tracking.py: the bare-Keras equivalent of `cifar-mlops train --exp EXP --set ...`.

Same arrays (data.load_splits), same model (create_model), same seed, optimizer and learning-rate
schedule (Adam or AdamW, constant or cosine), loss (with label smoothing), batch size, epochs and
input pipeline (pipeline.Batches); then the same predictions on train, val and test and
their accuracy. No MLflow, no figures, no model saving. Prints one JSON line.
--freeze-imports: import TensorFlow/Keras with the garbage collector paused, then gc.freeze() them,
as `cifar-mlops` does (process.heavy_imports): the bare script with the same GC treatment.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

STARTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exp", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--freeze-imports", action="store_true")
    args = parser.parse_args()

    times = {}
    t = time.perf_counter()
    if args.freeze_imports:
        gc.disable()
    import keras
    import numpy as np
    import tensorflow as tf  # noqa: F401  (timed with the rest of the start-up, as the CLI pays it)
    if args.freeze_imports:
        gc.freeze()
        gc.enable()
    times["import tensorflow"] = time.perf_counter() - t

    from cifar_mlops import data
    from cifar_mlops.config import parse_overrides, resolve
    from cifar_mlops.models import create_model
    from cifar_mlops.pipeline import Batches

    config = resolve(args.exp, parse_overrides(args.set))
    splits = data.load_splits(config.data)
    cfg = config.train
    keras.utils.set_random_seed(cfg.seed)
    model = create_model(config.model.name, num_classes=splits.num_classes, **config.model.settings())
    # the experiment's optimizer, schedule and loss, written as a notebook would (b5: AdamW, cosine, smoothing)
    learning_rate = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate, decay_steps=math.ceil(len(splits.y_train) / cfg.batch_size) * cfg.epochs)
    optimizer = (keras.optimizers.AdamW(learning_rate, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw"
                 else keras.optimizers.Adam(learning_rate))
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=["accuracy"])
    train_ds = Batches(splits.x_train, splits.y_train, batch_size=cfg.batch_size,
                       num_classes=splits.num_classes, training=True, seed=cfg.seed)
    val_ds = Batches(splits.x_val, splits.y_val, batch_size=cfg.batch_size,
                     num_classes=splits.num_classes, training=False)
    t = time.perf_counter()
    model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, verbose=2, shuffle=False)
    times["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    acc = {}
    for split, (x, y) in {"train": (splits.x_train, splits.y_train), "val": (splits.x_val, splits.y_val),
                          "test": (splits.x_test, splits.y_test)}.items():
        p = model.predict(x, batch_size=cfg.batch_size, verbose=0)
        acc[f"{split}_accuracy"] = float(np.mean(np.argmax(p, axis=1) == y))
    times["predict train/val/test"] = time.perf_counter() - t
    times["total in process"] = time.perf_counter() - STARTED
    print(json.dumps({**{k: round(v, 3) for k, v in times.items()}, **acc}))


if __name__ == "__main__":
    main()
