"""A team on one MLflow server with the basic-auth app: users, their roles, and refusals as one line.

The server enforces MLflow's own permissions (READ / EDIT / MANAGE per experiment and per
registered model; every user reads everything: the server's default permission is READ). A
role is a set of grants, given with MLflow's auth API (`AuthServiceClient`) by the admin:
- reader: reads runs and models, nothing more;
- trainer: creates runs in the project's experiments (EDIT) and registers what it trains into
  the candidates models `cifar10-<family>-candidates` (EDIT);
- maintainer: all of the trainer's, and MANAGE on the served models `cifar10-<family>`, the only
  models whose aliases (`@champion`, `@previous`) are served: a maintainer's `promote` copies a
  candidate version into its served model and moves the alias there.
In the server's checks, adding a version and setting an alias both need EDIT on that registered
model, so a trainer can neither register into nor move an alias of a served model.
"""

from __future__ import annotations

import warnings

import mlflow

from cifar_mlops.auth import MIN_PASSWORD_LENGTH
from cifar_mlops.errors import UserError
from cifar_mlops.tracking import registry, store
from cifar_mlops.tracking.results import REPORT_EXPERIMENT
from cifar_mlops.tracking.runs import ABLATION_EXPERIMENT
from cifar_mlops.tracking.studies import TUNING_EXPERIMENT

ROLES = ("reader", "trainer", "maintainer")
EXPERIMENTS = (ABLATION_EXPERIMENT, TUNING_EXPERIMENT, REPORT_EXPERIMENT)


class TeamError(UserError):
    """A user, role or password the team server cannot take; the message says which and why."""

    exit_code = 2


def families() -> list[str]:
    from cifar_mlops import models

    return sorted({models.get_model_entry(name).family for name in models.list_models()} | {"ensemble"})


def _auth_client():
    with warnings.catch_warnings():  # mlflow.server pulls in a deprecated Starlette module
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    uri = store.configure_store()
    if not uri.startswith(("http://", "https://")):
        raise TeamError(f"users and roles live on a team server; MLFLOW_TRACKING_URI is {store.redact(uri)}, "
                        "not http(s)://... (start one with `cifar-mlops server`)")
    return AuthServiceClient(uri)


def _admin_client(action: str):
    """The auth client, once the caller is known to be the admin: before anything is created, since any
    user may create experiments and registered models (and would then manage them)."""
    auth = _auth_client()
    with _as_admin(action):
        me = auth.get_user(store.user())
    if not me.is_admin:
        raise store.PermissionDenied(f"user {store.user()!r} may not {action}: only the team server's admin may "
                                     "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD must be the admin's)")
    return auth


def _as_admin(action: str):
    """An auth API call, its 401/403 as one line."""
    return store.permission_checked(action, "admin rights", "the team server (MLFLOW_TRACKING_USERNAME and "
                                    "MLFLOW_TRACKING_PASSWORD must be the admin's)")


def _ensure_resources() -> dict[str, str]:
    """The project's experiments and registered models exist (created by the admin); experiment name -> id."""
    client = store.client()
    ids = {}
    for name in EXPERIMENTS:
        found = client.get_experiment_by_name(name)
        ids[name] = found.experiment_id if found else client.create_experiment(name, tags=store.EXPERIMENT_TAGS)
    existing = {m.name for m in client.search_registered_models(max_results=1000)}
    for family in families():
        for name in (registry.registered_model_name(family), registry.candidates_name(registry.registered_model_name(family))):
            if name not in existing:
                client.create_registered_model(name, description=(
                    "what trainers register; a maintainer promotes from here" if registry.is_candidates(name)
                    else "served: its aliases are moved by maintainers only"))
    return ids


def grants(role: str, experiment_ids: dict[str, str]) -> list[tuple[str, str, str]]:
    """(resource type, resource id, permission) that make `role`."""
    if role not in ROLES:
        raise TeamError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if role == "reader":
        return []
    out = [("experiment", experiment_ids[name], "EDIT") for name in EXPERIMENTS]
    for family in families():
        served = registry.registered_model_name(family)
        out.append(("registered_model", registry.candidates_name(served), "EDIT" if role == "trainer" else "MANAGE"))
        if role == "maintainer":
            out.append(("registered_model", served, "MANAGE"))
    return out


def _revoke_role_grants(auth, username: str, experiment_ids: dict[str, str]) -> None:
    """Take every role grant from `username`, so that a role change is a clean one."""
    for resource_type, resource_id, _ in grants("maintainer", experiment_ids):
        try:
            auth.revoke_user_permission(username, resource_type, resource_id)
        except mlflow.exceptions.MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err):  # no such grant: nothing to take
                raise


def add_user(username: str, password: str, role: str) -> None:
    """Create `username` on the team server with `role` (the caller is the admin)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise TeamError(f"the password for {username!r} is {len(password)} characters; the server needs at least "
                        f"{MIN_PASSWORD_LENGTH}")
    grants(role, {name: "" for name in EXPERIMENTS})  # an unknown role fails before anything is asked
    auth = _admin_client(f"create user {username!r}")
    with _as_admin(f"create user {username!r}"):
        experiment_ids = _ensure_resources()
        role_grants = grants(role, experiment_ids)
        try:
            auth.create_user(username, password)
        except mlflow.exceptions.MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" in str(err):
                raise TeamError(f"user {username!r} exists already; change its role with "
                                f"`cifar-mlops team set-role {username} --role {role}`") from None
            raise
        for resource_type, resource_id, permission in role_grants:
            auth.grant_user_permission(username, resource_type, resource_id, permission)


def set_role(username: str, role: str) -> None:
    """Give existing user `username` exactly the grants of `role`."""
    grants(role, {name: "" for name in EXPERIMENTS})
    auth = _admin_client(f"change the role of {username!r}")
    with _as_admin(f"change the role of {username!r}"):
        experiment_ids = _ensure_resources()
        role_grants = grants(role, experiment_ids)
        try:
            auth.get_user(username)
        except mlflow.exceptions.MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err):
                raise TeamError(f"no user {username!r} on this server; add it with `cifar-mlops team add-user`") from None
            raise
        _revoke_role_grants(auth, username, experiment_ids)
        for resource_type, resource_id, permission in role_grants:
            auth.grant_user_permission(username, resource_type, resource_id, permission)


def _existing_user(auth, username: str, action: str):
    """The user `username` (its `User`), or a one-line TeamError when the server has none."""
    with _as_admin(action):
        try:
            return auth.get_user(username)
        except mlflow.exceptions.MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err):
                raise TeamError(f"no user {username!r} on this server; `cifar-mlops team list` shows who there is") from None
            raise


def remove_user(username: str) -> None:
    """Delete user `username` and its grants (the caller is the admin; the admin itself stays)."""
    auth = _admin_client(f"remove user {username!r}")
    user = _existing_user(auth, username, f"remove user {username!r}")
    if user.is_admin:
        raise TeamError(f"{username!r} is the team server's admin, who is not removed (it manages the others)")
    with _as_admin(f"remove user {username!r}"):
        auth.delete_user(username)


def set_password(username: str, password: str) -> None:
    """Give user `username` a new password (the caller is the admin); other server workers accept the old one
    for at most the auth cache's 30 s."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise TeamError(f"the password for {username!r} is {len(password)} characters; the server needs at least "
                        f"{MIN_PASSWORD_LENGTH}")
    auth = _admin_client(f"set the password of {username!r}")
    _existing_user(auth, username, f"set the password of {username!r}")
    with _as_admin(f"set the password of {username!r}"):
        auth.update_user_password(username, password)



def _get(auth, route: str, **params: str) -> dict:
    """GET an auth API route of the server as the caller (MLflow's client has no call for it)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    response = http_request(get_default_host_creds(auth.tracking_uri), route, "GET", params=params)
    return verify_rest_response(response, route).json()


def role_of(held: set[tuple[str, str, str]], experiment_ids: dict[str, str]) -> str:
    """The role whose grants are exactly those of `held` on the project's resources; else `custom`."""
    project = {(resource_type, resource_id) for resource_type, resource_id, _ in grants("maintainer", experiment_ids)}
    held = {grant for grant in held if grant[:2] in project}
    return next((role for role in ROLES if held == set(grants(role, experiment_ids))), "custom")


def list_users() -> list[dict[str, str]]:
    """Every user of the team server and its role (admin, reader, trainer, maintainer or custom); no secret."""
    auth = _admin_client("list the users")
    with _as_admin("list the users"):
        client = store.client()
        experiment_ids = {name: (found.experiment_id if (found := client.get_experiment_by_name(name)) else "")
                          for name in EXPERIMENTS}
        rows = []
        for user in sorted(_get(auth, "/api/2.0/mlflow/users/list")["users"], key=lambda u: u["username"]):
            if user["is_admin"]:
                rows.append({"user": user["username"], "role": "admin"})
                continue
            found = _get(auth, "/api/3.0/mlflow/users/permissions/list", username=user["username"])["permissions"]
            held = {(p["resource_type"], p["resource_pattern"], p["permission"]) for p in found}
            rows.append({"user": user["username"], "role": role_of(held, experiment_ids)})
    return rows
