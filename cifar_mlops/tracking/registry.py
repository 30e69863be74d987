"""The model registry: registering versions, finding them (by experiment id, alias or number), aliases."""

from __future__ import annotations

import os
from typing import Any

import mlflow
from mlflow import MlflowClient

from cifar_mlops.errors import UserError
from cifar_mlops.tracking import store


class RegistryError(UserError):
    """An unknown model, version or alias, or a version that breaks the image contract."""

    exit_code = 2


CANDIDATES_SUFFIX = "-candidates"
# Where `train`, `ensemble` and `tune --register-best` register new versions: `served` (cifar10-<family>)
# or `candidates` (cifar10-<family>-candidates: trainers on a team server, see tracking/team.py).
REGISTER_INTO = "CIFAR_MLOPS_REGISTER_INTO"


def registered_model_name(family: str) -> str:
    """The served model of `family`, whose aliases (`@champion`) are what is served."""
    return f"cifar10-{family}"


def candidates_name(served: str) -> str:
    return f"{served}{CANDIDATES_SUFFIX}"


def is_candidates(name: str) -> bool:
    return name.endswith(CANDIDATES_SUFFIX)


def served_name(name: str) -> str:
    """The served model that a candidates model feeds (a served model's own name)."""
    return name.removesuffix(CANDIDATES_SUFFIX)


def registration_name(family: str) -> str:
    """The registered model a new version of `family` goes to, as $CIFAR_MLOPS_REGISTER_INTO says."""
    target = os.environ.get(REGISTER_INTO) or "served"
    if target not in ("served", "candidates"):
        raise RegistryError(f"{REGISTER_INTO}={target!r}: choose served or candidates")
    served = registered_model_name(family)
    return candidates_name(served) if target == "candidates" else served


# MLflow's basic-auth app answers a user's own effective permission on a resource here (admin or self only).
USER_PERMISSION_ROUTE = "/api/3.0/mlflow/users/permissions/get"


def _own_permission(uri: str, user: str, resource_type: str, resource_id: str) -> str | None:
    """The user's effective permission on a resource as the team server resolves it; None where the server has
    no basic-auth app (no users, nothing to check)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    response = http_request(get_default_host_creds(uri), USER_PERMISSION_ROUTE, "GET", max_retries=2, params={
        "username": user, "resource_type": resource_type, "resource_id": resource_id})
    return response.json().get("permission", "") if response.status_code == 200 else None


def check_may_register(family: str, experiment: str | None = None) -> None:
    """On a team server, refuse at once (one line, before anything is trained) when the user may not add
    versions to the registered model a training of `family` goes to: that needs EDIT on it. It asks the
    server for the user's own permissions (what any user may read about itself); elsewhere (a local store,
    a server without users, a model not made yet) there is nothing to ask, and registering decides. A user
    who may not create runs in `experiment` either (a reader) is left to the server's refusal of the run,
    which comes before any training too."""
    uri = store.configure_store()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not store.is_server(uri) or not user:
        return
    name = registration_name(family)
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        refused = store.refusal(err, f"register into {name}", "READ", f"registered model {name}")
        if refused is None:
            raise
        raise refused from None
    permission = _own_permission(uri, user, "registered_model", name)
    if permission is None or permission in ("EDIT", "MANAGE"):
        return
    found = client.get_experiment_by_name(experiment) if experiment else None
    if found is not None and _own_permission(uri, user, "experiment", found.experiment_id) not in ("EDIT", "MANAGE"):
        return
    candidates = candidates_name(name)
    hint = (f"; trainers register into {candidates} (export {REGISTER_INTO}=candidates)"
            if not is_candidates(name) and _own_permission(uri, user, "registered_model", candidates) in ("EDIT", "MANAGE")
            else "")
    raise store.PermissionDenied(
        f"user {user!r} may not register into {name} (it holds {permission or 'no permission'} there; registering "
        f"needs EDIT on registered model {name}, which the team's admin grants: `cifar-mlops team set-role`)"
        f"{hint}; nothing was trained")


class RegisteredVersion:
    """One registered model version, as the rest of the package sees it."""

    def __init__(self, mv: Any, aliases: tuple[str, ...] | None = None) -> None:
        self.name: str = mv.name
        self.version = int(mv.version)
        self.run_id: str = mv.run_id or ""
        self.tags: dict[str, str] = dict(mv.tags or {})
        self.aliases: tuple[str, ...] = tuple(sorted(aliases if aliases is not None else (mv.aliases or ())))
        self.created_ms = int(mv.creation_timestamp or 0)
        self.description: str = mv.description or ""  # markdown: what it is, then each promotion's account

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def exp_id(self) -> str:
        return self.tags.get("exp_id", "?")

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"

    def __repr__(self) -> str:
        return f"RegisteredVersion({self})"


def register(model_uri: str, name: str, tags: dict[str, str], description: str = "") -> int:
    """Register `model_uri` as a new version of `name` with `tags` and `description` (markdown, shown on the
    version's page in the UI); return its number."""
    with store.permission_checked(f"register a version of {name}", "EDIT", f"registered model {name}"):
        version = mlflow.register_model(model_uri, name, tags=tags).version
        if description:
            MlflowClient().update_model_version(name, str(version), description=description)
    return int(version)


def append_description(name: str, version: int, text: str) -> None:
    """Add `text` (markdown) as a new paragraph at the end of the version's description."""
    client = store.client()
    with store.permission_checked(f"describe {name}/{version}", "EDIT", f"registered model {name}"):
        before = client.get_model_version(name, str(version)).description or ""
        client.update_model_version(name, str(version), description=f"{before.rstrip()}\n\n{text}".lstrip())


def _registered_model(client: MlflowClient, name: str):
    if not name or "'" in name:
        raise RegistryError(f"{name!r} is not a registered model name")
    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none yet"
        raise RegistryError(f"unknown registered model {name!r} (registered: {known})") from None


def versions_of(client: MlflowClient, name: str) -> list[RegisteredVersion]:
    """Every version of `name`, oldest first, with its aliases."""
    model = _registered_model(client, name)
    # search results carry no aliases: take them from the registered model (alias -> version)
    aliases: dict[int, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(int(number), []).append(alias)
    found = client.search_model_versions(f"name = '{name}'")
    return sorted((RegisteredVersion(mv, tuple(aliases.get(int(mv.version), ()))) for mv in found),
                  key=lambda v: v.version)


def exists(name: str) -> bool:
    return bool(store.client().search_registered_models(filter_string=f"name = '{name}'"))


def alias_holder(name: str, alias: str) -> RegisteredVersion | None:
    """The version of `name` holding `alias`, or None (the model itself must exist)."""
    client = store.client()
    model = _registered_model(client, name)
    if alias not in (model.aliases or {}):
        return None
    return RegisteredVersion(client.get_model_version_by_alias(name, alias))


def find_version(name: str, *, exp_id: str | None = None, alias: str | None = None,
                 version: int | None = None) -> RegisteredVersion:
    """The version of `name` holding `alias`, or numbered `version`, or the newest tagged `exp_id`."""
    client = store.client()
    try:
        versions = versions_of(client, name)
    except RegistryError as err:
        if exp_id is not None:  # say how to make it exist
            raise RegistryError(f"{err}; train experiment {exp_id} with `cifar-mlops train --exp {exp_id}`") from None
        raise
    if exp_id is not None:
        tagged = [v for v in versions if v.tags.get("exp_id") == exp_id]
        if not tagged:
            raise RegistryError(f"{name} has no version of experiment {exp_id}; "
                                f"train one with `cifar-mlops train --exp {exp_id}`")
        return tagged[-1]
    if alias is not None:
        holder = alias_holder(name, alias)
        if holder is None:
            raise RegistryError(f"{name} has no version with alias @{alias}; "
                                f"set one with `cifar-mlops promote {name} --version N --alias {alias}`")
        return holder
    chosen = next((v for v in versions if v.version == version), None)
    if chosen is None:
        have = ", ".join(str(v.version) for v in versions) or "none"
        raise RegistryError(f"{name} has no version {version} (versions: {have})")
    return chosen


def list_registered() -> list[tuple[str, list[RegisteredVersion]]]:
    """Every registered model with its versions (oldest first), models by name."""
    client = store.client()
    names = sorted(m.name for m in client.search_registered_models())
    return [(name, versions_of(client, name)) for name in names]


def set_version_tags(name: str, version: int, tags: dict[str, Any]) -> None:
    """Tags of one model version (MLflow has no batch call for these)."""
    client = store.client()
    with store.permission_checked(f"tag {name}/{version}", "EDIT", f"registered model {name}"):
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, str(value))


def set_alias(version: RegisteredVersion, alias: str) -> None:
    """Point `alias` of the version's model at it (taking it from whichever version held it)."""
    with store.permission_checked(f"move @{alias} of {version.name}", "EDIT", f"registered model {version.name}"):
        store.client().set_registered_model_alias(version.name, alias, str(version.version))


def copy_version(version: RegisteredVersion, name: str) -> RegisteredVersion:
    """Copy `version` (its files, tags and lineage) as a new version of registered model `name`."""
    client = store.client()
    with store.permission_checked(f"copy {version} into {name}", "EDIT", f"registered model {name}"):
        copied = client.copy_model_version(version.uri, name)
    return RegisteredVersion(client.get_model_version(name, copied.version))


def delete_version(version: RegisteredVersion) -> None:
    store.client().delete_model_version(version.name, str(version.version))
