"""Running many trainings: the task queue, worker processes on this machine, heartbeats, dead workers.

- `liveness`: whether a process is still alive (psutil), and the one heartbeat thread (no Optuna);
- `queue`: Optuna storages as the shared store of a queue of fixed tasks (an ablation's (variant, seed) runs),
  processes agreeing on one parent run, dead workers' tasks failed and queued again;
- `workers`: worker processes `cifar-mlops worker` on this machine, one GPU each, and what they are given.

Tuning (`cifar_mlops.tune`) runs its trials through `study.optimize` on the same storages, liveness and workers;
ablations (and selection) run on `queue` and never import `tune`. Only this package and `tune` use Optuna.
Nothing is imported here, so `tracking` can use `liveness` without importing Optuna.
"""
