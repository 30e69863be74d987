"""Everything MLflow, one module per job; no other package module imports mlflow.

- `store`: which store, checking it answers, creating its tables once (locks), where to look at it;
- `runs`: starting, adopting (`mlflow run`), describing, logging in batches and ending runs; `TrainingRun`;
- `registry`: registering versions, finding them by experiment id, alias or number, moving aliases;
- `served`: logging trained models and ensembles, their image contract, loading them back;
- `image_model`: every logged model's code (images in, class names and probabilities out, soft voting
  over members), both where it is evaluated and where it is served;
- `studies`: tuning's parent and trial runs;
- `results`: reading finished runs for reports, logging a report run;
- `ablations`: an ablation's parent run and its (variant, seed) runs; FINISHED runs by config digest;
- `selections`: a forward selection's parent run, its steps, its description;
- `team`: users and roles on a team server (MLflow's auth API).
- `team_app`: the team server's auth app (`mlflow server --app-name cifar-team`), loaded by the server only.
"""

from cifar_mlops.tracking import (
    ablations,
    image_model,
    registry,
    results,
    runs,
    selections,
    served,
    store,
    studies,
    team,
)

__all__ = ["ablations", "image_model", "registry", "results", "runs", "selections", "served", "store", "studies",
           "team"]
