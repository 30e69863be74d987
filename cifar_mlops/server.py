"""`cifar-mlops server`: the team's MLflow tracking server, started the one way this project supports.

MLflow's own `mlflow server` on PostgreSQL, with proxied artifacts (a folder or an s3:// bucket)
and the basic-auth app, extended as MLflow allows (`--app-name cifar-team`, `cifar_mlops.tracking.team_app`:
readers create nothing). What this wrapper adds: it creates the databases that are missing (the
runs', the users', the Optuna studies'), keeps every password off command lines and out of logs
(the admin's comes from $MLFLOW_AUTH_ADMIN_PASSWORD or a file; a database password from the URL
moves to $PGPASSWORD), writes the auth app's settings to a private file, and prints what each
machine must export. Then it becomes `mlflow server` (exec), so signals reach MLflow directly.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cifar_mlops.auth import MIN_PASSWORD_LENGTH
from cifar_mlops.errors import UserError, first_line, redact
from cifar_mlops.progress import log

AUTH_SUFFIX, STUDIES_SUFFIX = "_auth", "_optuna"  # databases beside the runs' database on the same server


class ServerError(UserError):
    """The server cannot start as asked; the message says what to change."""

    exit_code = 2


@dataclass(frozen=True)
class Databases:
    runs: str  # SQLAlchemy URLs, without password
    users: str
    studies: str
    password: str | None  # of the database user, passed as $PGPASSWORD


def databases(backend_store_uri: str) -> Databases:
    """The runs' database named in `backend_store_uri`, and the users' and studies' beside it."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(backend_store_uri)
    except sqlalchemy.exc.ArgumentError:
        raise ServerError(f"--backend-store-uri {redact(backend_store_uri)} is not a database URL; "
                          "use postgresql://USER@HOST:5432/DATABASE") from None
    if url.get_backend_name() != "postgresql" or not url.database:
        raise ServerError(f"--backend-store-uri {redact(backend_store_uri)}: the team server keeps its runs in "
                          "PostgreSQL; use postgresql://USER@HOST:5432/DATABASE")
    bare = url.set(password=None)
    return Databases(runs=bare.render_as_string(), users=bare.set(database=url.database + AUTH_SUFFIX).render_as_string(),
                     studies=bare.set(database=url.database + STUDIES_SUFFIX).render_as_string(),
                     password=url.password)


def create_missing(dbs: Databases) -> list[str]:
    """Create the databases that do not exist yet (connecting to `postgres` on the same server); their names."""
    import sqlalchemy

    url = sqlalchemy.engine.make_url(dbs.runs).set(password=dbs.password)
    engine = sqlalchemy.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                                      poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10})
    created = []
    try:
        with engine.connect() as connection:
            for uri in (dbs.runs, dbs.users, dbs.studies):
                name = sqlalchemy.engine.make_url(uri).database
                found = connection.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                           {"name": name}).first()
                if not found:
                    connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
                    created.append(name)
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise ServerError(f"cannot prepare the databases on {redact(str(url.set(database=None)))} "
                          f"({first_line(err)}); check that PostgreSQL answers and the user may create databases") from None
    finally:
        engine.dispose()
    return created


def admin_password(password_file: str | None) -> str:
    if password_file:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as err:
            raise ServerError(f"--admin-password-file {password_file}: {err.strerror or err}") from None
    else:
        password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        raise ServerError("no admin password: set MLFLOW_AUTH_ADMIN_PASSWORD or pass --admin-password-file FILE "
                          "(never on the command line)")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ServerError(f"the admin password is {len(password)} characters; the server needs at least "
                          f"{MIN_PASSWORD_LENGTH}")
    return password


def auth_settings(users_db: str, admin: str) -> Path:
    """The basic-auth app's settings (no password in them), in a file only this user can read."""
    handle, name = tempfile.mkstemp(prefix="cifar-mlops-auth-", suffix=".ini")
    os.fchmod(handle, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(handle, "w") as stream:
        stream.write("[mlflow]\n"
                     "default_permission = READ\n"  # every user reads everything; roles add EDIT / MANAGE
                     f"database_uri = {users_db}\n"
                     f"admin_username = {admin}\n"
                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                     # A checked password is trusted for 30 s: without it every request pays a PBKDF2 hash,
                     # which makes a training's many small logging calls several times slower. A changed
                     # password or role reaches the other server workers within those 30 s.
                     "auth_cache_ttl_seconds = 30\n")
    return Path(name)


LOOPBACK = ("127.0.0.1", "localhost")  # the server's own machine keeps answering when --allowed-hosts names others


def host_patterns(allowed_hosts: str, port: int) -> str:
    """MLflow's --allowed-hosts for the names given: MLflow compares the whole Host header, which carries the port
    when the client uses one (http://NAME:PORT) and none behind a TLS proxy on 443 (https://NAME), so each
    name is allowed both ways; a name given with a port or a pattern is kept as it is."""
    names = [name.strip() for name in allowed_hosts.split(",") if name.strip()]
    patterns = []
    for name in [*names, *LOOPBACK]:
        patterns += [name] if (":" in name or "*" in name) else [name, f"{name}:{port}"]
    return ",".join(dict.fromkeys(patterns))


def command(dbs: Databases, artifacts: str, host: str, port: int, workers: int, allowed_hosts: str = "") -> list[str]:
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    return [mlflow, "server", "--app-name", "cifar-team", "--backend-store-uri", dbs.runs,
            "--artifacts-destination", artifacts, "--serve-artifacts", "--host", host, "--port", str(port),
            "--workers", str(workers), *(["--allowed-hosts", host_patterns(allowed_hosts, port)] if allowed_hosts else [])]


def what_to_export(dbs: Databases, host: str, port: int, allowed_hosts: str = "") -> list[str]:
    named = [name.strip().split(":")[0] for name in allowed_hosts.split(",") if name.strip() and "*" not in name]
    shown = named[0] if named else "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return [
        f"team server: http://{shown}:{port} (runs: {dbs.runs}, users: {dbs.users}, Optuna studies: {dbs.studies})",
        "every machine exports:",
        f"  export MLFLOW_TRACKING_URI=http://{shown}:{port}   # this machine's address as the others reach it",
        "  export MLFLOW_TRACKING_USERNAME=<their user>  MLFLOW_TRACKING_PASSWORD=<their password>",
        "trainers also export CIFAR_MLOPS_REGISTER_INTO=candidates (they register into cifar10-<family>-candidates),",
        f"and tune with --storage {dbs.studies} (the database password from PGPASSWORD or ~/.pgpass);",
        "the admin adds users: cifar-mlops team add-user NAME --role reader|trainer|maintainer",
    ]


def serve(backend_store_uri: str, artifacts: str, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 2,
          admin: str = "admin", admin_password_file: str | None = None, allowed_hosts: str = "") -> None:
    """Prepare the databases and the auth settings, print what to export, and become `mlflow server`."""
    dbs = databases(backend_store_uri)
    password = admin_password(admin_password_file)
    if not artifacts.startswith("s3://"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    created = create_missing(dbs)
    if created:
        log(f"created database(s) {', '.join(created)}")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth_settings(dbs.users, admin)),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           # CSRF tokens of the UI: set it yourself to keep browser sessions across restarts
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # its uvicorn
           # MLflow's background job runners (GenAI evaluation jobs, 7 processes) are not used here
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    if dbs.password:
        env["PGPASSWORD"] = dbs.password
    for line in what_to_export(dbs, host, port, allowed_hosts):
        log(line, prefix="cifar-mlops server")
    argv = command(dbs, artifacts, host, port, workers, allowed_hosts)
    os.execvpe(argv[0], argv, env)
