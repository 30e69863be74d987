"""`mlflow server --app-name cifar-team`: MLflow's basic-auth app, with readers that create nothing.

MLflow's basic-auth app lets any signed-in user create an experiment or a registered model (the
new resource's creator then MANAGEs it, and may log runs and versions there): its `default_permission`
is the permission on what exists, not a right to create. This app is the basic-auth app (`create_app`
of `mlflow.server.auth`, registered under the `mlflow.app` entry point group, the way MLflow's docs
extend it) plus one `before_request` hook, run after basic-auth's own: a request that would create
a resource its creator then manages (an experiment, a registered model or prompt, a scorer, an AI
gateway secret, endpoint or model definition) is refused with 403 unless the user is the admin or
holds EDIT or MANAGE on one of the project's experiments, which only the trainer and maintainer
roles grant (`cifar_mlops.tracking.team`). Readers hold nothing there, so they create nothing and
hence can log nothing: runs and versions need EDIT on an existing experiment or model.
"""

from __future__ import annotations

import functools
import json
import warnings

# What the trainer and maintainer roles grant EDIT / MANAGE on (`tracking.team.EXPERIMENTS`, tested equal).
ROLE_EXPERIMENTS = ("cifar10-ablation", "cifar10-tuning", "cifar10-reports")
WRITING = ("EDIT", "MANAGE")


@functools.cache
def _creating_routes() -> frozenset[tuple[str, str]]:
    """(path, method) of every route whose after-request handler makes the caller MANAGE what it created."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.server import auth

    return frozenset(key for key, handler in auth.AFTER_REQUEST_HANDLERS.items()
                     if handler.__name__.startswith("set_can_manage_"))


def may_create(username: str) -> bool:
    """Whether `username` may create experiments and registered models: the admin, a trainer, a maintainer."""
    from mlflow.server import auth
    from mlflow.server.handlers import _get_tracking_store

    if auth.store.get_user(username).is_admin:
        return True
    writable = {p.experiment_id for p in auth.store.list_experiment_permissions(username) if p.permission in WRITING}
    if not writable:
        return False
    tracking = _get_tracking_store()
    for name in ROLE_EXPERIMENTS:
        experiment = tracking.get_experiment_by_name(name)
        if experiment is not None and experiment.experiment_id in writable:
            return True
    return False


def refuse_readers_creating():
    """Flask `before_request`: 403 for a creating request of a user who may not create (None: go on)."""
    from flask import g, make_response, request

    if (request.path, request.method) not in _creating_routes():
        return None
    username = getattr(g, "mlflow_authenticated_user", None)
    if username is None or may_create(username):  # None: basic-auth's own hook answered already
        return None
    response = make_response(json.dumps({
        "error_code": "PERMISSION_DENIED",
        "message": f"user {username!r} may not create experiments or registered models: only the admin, "
                   "trainers and maintainers may (cifar-mlops team set-role)"}), 403)
    response.mimetype = "application/json"
    return response


def create_app():
    """The basic-auth app with `refuse_readers_creating` after its own checks (entry point `cifar-team`)."""
    with warnings.catch_warnings():  # mlflow.server.auth pulls in a deprecated Starlette module
        warnings.simplefilter("ignore")
        from mlflow.server import app
        from mlflow.server.auth import create_app as basic_auth

    served = basic_auth(app)
    app.before_request(refuse_readers_creating)
    return served
