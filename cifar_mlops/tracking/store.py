"""Opening the MLflow store: which one, checking that it answers, creating its tables once."""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient

from cifar_mlops.errors import StoreUnavailable, UserError, first_line, redact

SCHEMA_LOCK_KEY = 0x63696661726D6C  # a PostgreSQL advisory lock id ("cifarml"): one store creation at a time


def configure_store() -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith(("postgresql", "mysql")):
        _check_database(uri)
    mlflow.set_tracking_uri(uri)
    open_store(uri)
    return uri


def client() -> MlflowClient:
    """A client of the configured store (opened and checked first)."""
    configure_store()
    return MlflowClient()


# MLflow 3.17's UI opens an experiment in its GenAI view (traces) unless the URL asks for the "Model training"
# view, or the experiment's kind says so: every link printed asks for it, every experiment made carries the kind.
TRAINING_VIEW = "workflowType=machine_learning"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def run_page(experiment_id: str, run_id: str) -> str:
    """The UI's page of one run (a `page` of `ui_link`)."""
    return f"experiments/{experiment_id}/runs/{run_id}"


def version_page(name: str, version: int | str) -> str:
    """The UI's page of one registered model version (a `page` of `ui_link`)."""
    return f"models/{quote(name, safe='')}/versions/{version}"


def ui_link(uri: str, page: str = "experiments") -> str:
    """The address of `page` in MLflow's UI, in its training view: on a team server its own address (without
    any user name or password the URL holds), else where `mlflow ui` serves (see `where_to_look`)."""
    if is_server(uri):
        parts = urlsplit(uri)
        base = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""),
                           parts.path.rstrip("/"), "", ""))
    else:
        base = LOCAL_UI
    return f"{base}/#/{page}?{TRAINING_VIEW}"


def where_to_look(uri: str, page: str = "experiments") -> str:
    """How to see `page` of the store in MLflow's UI: a server's link, else the `mlflow ui` command that serves
    the store, then the link."""
    if is_server(uri):
        return f"open {ui_link(uri, page)}"
    return f"run `mlflow ui --backend-store-uri {shlex.quote(redact(uri))} --workers 1`, then open {ui_link(uri, page)}"


def where_to_see_run(uri: str, run_id: str) -> str:
    """How to open run `run_id`'s own page (a parent run: its description, tables and plots) in MLflow's UI."""
    return where_to_look(uri, run_page(MlflowClient(uri).get_run(run_id).info.experiment_id, run_id))


def quiet_mlflow() -> None:
    """Keep MLflow's info lines (registry chatter, emoji links) off the user's terminal."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def open_store(uri: str) -> None:
    """Make MLflow create (or check) the store's tables and cache it for this process."""
    import sqlalchemy  # MLflow's SQL stores raise its errors

    try:
        if uri.startswith("sqlite:///") and "?" not in uri and ":memory:" not in uri:
            _open_sqlite_store(uri)
        elif uri.startswith("postgresql"):
            _open_postgresql_store(uri)
        else:
            MlflowClient(uri)
    except (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError, OSError) as err:
        raise StoreUnavailable(f"the MLflow tracking store {redact(uri)} cannot be opened ({first_line(err)}); fix "
                               "MLFLOW_TRACKING_URI, or unset it to use ./mlflow.db in a writable folder") from None


@functools.cache
def _open_sqlite_store(uri: str) -> None:
    """Create (or check) a SQLite store's tables while holding an exclusive file lock.

    Two processes opening a new store at once (two `train` commands in a fresh folder)
    would both run MLflow's schema migrations and both fail; with the lock the second
    finds the tables made. The lock is its own file beside the database (`mlflow.db.lock`,
    left in place as filelock does), so it never meets the locks SQLite itself takes.
    """
    from filelock import FileLock

    path = uri.removeprefix("sqlite:///")
    open(path, "ab").close()  # a file that cannot be made (no such folder, no permission) fails here, not in filelock
    with FileLock(f"{path}.lock"):
        MlflowClient(uri)  # MLflow caches the store per URI: later clients reuse it


@functools.cache
def _open_postgresql_store(uri: str) -> None:
    """Create (or check) a PostgreSQL store's tables while holding a session-level advisory lock.

    As for SQLite: processes started together on an empty database would all run MLflow's
    migrations, and all but one fail ("duplicate key value violates unique constraint").
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as lock:  # released when this connection closes, however we leave
            lock.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            MlflowClient(uri)
    finally:
        engine.dispose()


@functools.cache
def _check_server(uri: str) -> None:
    """Fail fast on a server that does not answer: MLflow itself retries for minutes before giving up."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10)
    except requests.RequestException as err:
        reason = type(err).__name__
        raise StoreUnavailable(
            f"the MLflow tracking server {uri} does not answer ({reason}); start it, fix MLFLOW_TRACKING_URI, "
            "or unset it to use ./mlflow.db"
        ) from None


@functools.cache
def _check_database(uri: str) -> None:
    """Fail fast on a database that does not answer: MLflow itself retries for minutes before giving up."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StoreUnavailable(
            f"the MLflow tracking database {redact(uri)} cannot be used ({first_line(err)}); start it, "
            "fix MLFLOW_TRACKING_URI, or unset it to use ./mlflow.db"
        ) from None
    finally:
        engine.dispose()


class PermissionDenied(UserError):
    """A team server refused an action: who asked, the permission missing, who can grant it."""

    exit_code = 3


def user() -> str:
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none: MLFLOW_TRACKING_USERNAME is not set)"


def refusal(err: BaseException, action: str = "", permission: str = "", resource: str = "") -> PermissionDenied | None:
    """A server's 401/403 as one line naming the user, and what `action` needs when it is known
    (never the password); None for any other error."""
    text = str(err)
    if not isinstance(err, mlflow.exceptions.MlflowException):
        return None
    doing = action or "do that (" + (re.search(r"endpoint (\S+)", text) or [None, "a request"])[1] + ")"
    if "error code 401" in text or "UNAUTHENTICATED" in text:
        return PermissionDenied(f"the server does not know user {user()!r} with that password, so it cannot "
                                f"{doing}; check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if "error code 403" in text or "PERMISSION_DENIED" in text:
        needs = f"that needs {permission} on {resource}, which" if permission else "the permission it needs"
        return PermissionDenied(f"the server refused user {user()!r} to {doing}: {needs} the team's admin grants "
                                "(`cifar-mlops team set-role`)")
    return None


def server_failure(err: BaseException) -> StoreUnavailable | None:
    """A tracking server that failed a request (it answered 5xx, or broke off an upload it could not store) as
    one line naming the request and where to look; None for any other error. Only the URL's path and the
    failure are kept: a server's reply never carries the credentials of the store behind it into this line."""
    if not isinstance(err, mlflow.exceptions.MlflowException):
        return None
    text = str(err)
    asked = re.search(r"API request to (?:endpoint )?(\S+) failed", text)
    failed = re.search(r"too many (5\d\d) error responses|failed with error code (5\d\d)", text)
    # A server that fails an upload may answer before it has read the body and close the connection: the
    # client then sees a reset, not the 500 (which one depends on timing and on MLflow's retries).
    reset = re.search(r"failed with exception .*Connection (aborted|reset)", text)
    if not asked or not (failed or reset):
        return None
    path = urlsplit(asked[1]).path or asked[1]
    what = f"answered {failed[1] or failed[2]} to" if failed else "broke off (connection reset) the request to"
    return StoreUnavailable(f"the tracking server {redact(mlflow.get_tracking_uri())} {what} {path}; its log says "
                            "why (artifacts it cannot store: check its --artifacts-destination and that store's "
                            "credentials, on the server)")


@contextmanager
def permission_checked(action: str, permission: str, resource: str) -> Iterator[None]:
    """The server's 401/403 for `action` as one line naming the user, `permission` on `resource`, and
    who can grant it."""
    try:
        yield
    except mlflow.exceptions.MlflowException as err:
        refused = refusal(err, action, permission, resource)
        if refused is None:
            raise
        raise refused from None
