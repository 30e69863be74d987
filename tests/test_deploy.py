"""The cluster recipes in deploy/ run real `cifar-mlops` commands: every command they hold (the Kubernetes
Job's container, the Slurm array's `srun`, the Dockerfile's RUN lines) parses with the CLI's own click
parser, down to the values' types and choices, and names only options that exist. So renaming an option,
or a command, in cli.py fails here until the recipes follow. Also checked: the Job runs N workers of one GPU
each with every credential from the Secret, the Slurm array has the size it says, the image installs an
extra of pyproject.toml. Nothing is built or submitted (no docker, kubectl or Slurm needed)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from cifar_mlops import cli
from cifar_mlops import config as cfg
from tests.conftest import REPO
from tests.helpers import PROGRAM, PYPROJECT, parse

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
JOB = DEPLOY / "k8s" / "tune-workers.yaml"
SECRET = DEPLOY / "k8s" / "secret.example.yaml"
SBATCH = DEPLOY / "slurm" / "tune-workers.sbatch"
WORKER_ENV = DEPLOY / "worker.env.example"
# What a worker needs (deploy/worker.env.example), from the Secret or the private env file: a literal value
# of any of these in a recipe would be a leaked credential or one site's address.
WORKER_KEYS = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "OPTUNA_STORAGE",
               "PGPASSWORD"}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|USERNAME|STORAGE|CREDENTIAL|PGPASS", re.IGNORECASE)
PASSWORD_IN_URL = re.compile(r"://[^/@\s]*:[^/@\s]*@")
SHELL_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")
K8S_VAR = re.compile(r"\$\((\w+)\)")
STOP = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")", ">&", "<&"}
LAUNCHERS = {"srun", "exec"}


# ---------------------------------------------------------------------------
# Parsing a command line with the CLI's own parser


def with_option_renamed(option: str, to: str, group: click.Group = cli.main) -> click.Group:
    """A copy of the CLI in which `option` is spelled `to`, in every command that has it."""
    commands = {}
    for name, command in group.commands.items():
        params = []
        for param in command.params:
            if option in getattr(param, "opts", ()) or option in getattr(param, "secondary_opts", ()):
                param = copy.copy(param)
                param.opts = [to if o == option else o for o in param.opts]
                param.secondary_opts = [to if o == option else o for o in param.secondary_opts]
            params.append(param)
        commands[name] = click.Command(name, params=params, callback=command.callback, hidden=command.hidden)
    return click.Group(PROGRAM, commands=commands)


# ---------------------------------------------------------------------------
# Reading the recipes


def logical_lines(text: str) -> list[str]:
    """Shell or Dockerfile text with backslash-newline continuations joined."""
    return re.sub(r"\\\n", " ", text).splitlines()


def shell_commands(text: str, substitute) -> list[list[str]]:
    """Every `cifar-mlops ...` command of shell text (alone or after `srun` / `exec`, up to `&&`, `;`, a
    pipe or a redirection), with `$VAR` / `${VAR}` replaced by `substitute(name)`."""
    found = []
    for line in logical_lines(text):
        if line.lstrip().startswith("#") or not re.search(rf"(^|[\s;&|(]){PROGRAM}(\s|$)", line):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        at_command = [i for i, t in enumerate(tokens) if t == PROGRAM  # not an argument (pip uninstall cifar-mlops)
                      and (i == 0 or tokens[i - 1] in STOP or (tokens[i - 1] in LAUNCHERS and (
                          i == 1 or tokens[i - 2] in STOP)))]
        for start in at_command:
            end = next((i for i in range(start, len(tokens)) if tokens[i] in STOP), len(tokens))
            found.append([SHELL_VAR.sub(lambda m: substitute(m[1] or m[2]), t) for t in tokens[start:end]])
    return found


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, its text) in order, comments left out."""
    out = []
    for line in logical_lines(DOCKERFILE.read_text()):
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def instructions(name: str) -> list[str]:
    return [rest for instruction, rest in dockerfile() if instruction == name]


def entrypoint() -> list[str]:
    [text] = instructions("ENTRYPOINT")
    return json.loads(text)  # the exec form: a JSON list


def k8s_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def jobs() -> list[dict]:
    found = [doc for doc in k8s_documents(JOB) if doc.get("kind") == "Job"]
    assert found, f"{JOB.name} holds no Job"
    return found


def containers(job: dict) -> list[dict]:
    return job["spec"]["template"]["spec"]["containers"]


def container_argv(container: dict) -> list[str]:
    """What the container runs: `command` + `args`; without `command`, the image's ENTRYPOINT + `args`, and
    `$(VAR)` replaced as Kubernetes does, from the container's env (a Secret's value: `<VAR>`)."""
    words = [*container.get("command", entrypoint()), *container.get("args", [])]
    assert all(isinstance(w, str) for w in words), f"command/args must be strings (quote numbers): {words}"
    env = {e["name"]: e for e in container.get("env", [])}

    def value(match: re.Match) -> str:
        name = match[1]
        assert name in env, f"$({name}) is not in the container's env: Kubernetes would pass it as it is"
        return env[name].get("value", f"<{name}>")

    return [K8S_VAR.sub(value, w) for w in words]


def sbatch_directives() -> dict[str, str]:
    """`#SBATCH --name=value` lines as {name: value} (Slurm takes an unquoted `#` as a comment's start)."""
    out = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH"):
            option = line.removeprefix("#SBATCH").split("#")[0].strip()
            name, _, value = option.partition("=")
            out[name] = value
    return out


def sbatch_defaults() -> dict[str, str]:
    """The script's `NAME=${NAME:-default}` settings, defaults expanded (the values a plain `sbatch` uses)."""
    defaults: dict[str, str] = {}
    for name, default in re.findall(r"^(\w+)=\$\{\1:-([^}\s]*)\}", SBATCH.read_text(), re.MULTILINE):
        defaults[name] = SHELL_VAR.sub(lambda m: defaults.get(m[1] or m[2], m[0]), default)
    return defaults


def sbatch_argv() -> list[str]:
    defaults = sbatch_defaults()

    def value(name: str) -> str:
        assert name in defaults or name in WORKER_KEYS, f"${name} is neither set in the script nor a worker key"
        return defaults.get(name, f"<{name}>")

    commands = shell_commands(SBATCH.read_text(), value)
    assert len(commands) == 1, f"{SBATCH.name} should run one {PROGRAM} command, runs {commands}"
    return commands[0]


def env_file_keys(path: Path) -> set[str]:
    return {line.partition("=")[0].strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")}


def recipes() -> dict[str, list[str]]:
    """Every tuning worker's command line, by where it comes from."""
    out = {f"{JOB.name}:{c['name']}": container_argv(c) for job in jobs() for c in containers(job)}
    out[SBATCH.name] = sbatch_argv()
    return out


# ---------------------------------------------------------------------------
# The commands


@pytest.mark.parametrize("where", sorted(recipes()))
def test_a_worker_runs_one_tune_process_against_the_shared_study(where: str) -> None:
    command, params = parse(recipes()[where])
    assert command is cli.main.commands["tune"], f"{where} runs `{PROGRAM} {command.name}`, not tune"
    assert params["exp_id"] in cfg.list_experiments(), f"{where}: no experiment {params['exp_id']!r} in the catalogue"
    assert params["study_name"], f"{where}: name the study (--study) that every worker shares"
    # the study's storage and its credentials come from the Secret / the private env file, never literally
    assert params["storage"] == "<OPTUNA_STORAGE>", f"{where}: --storage {params['storage']!r}, not $OPTUNA_STORAGE"
    assert params["workers"] == 1, f"{where}: one process per worker, on its one GPU"
    assert not params["register_best"], f"{where}: N workers would each register the best configuration"


def test_the_kubernetes_and_slurm_workers_run_the_same_command() -> None:
    parsed = {where: parse(argv)[1] for where, argv in recipes().items()}
    first, *others = parsed.items()
    for where, params in others:
        assert params == first[1], f"{where} and {first[0]} differ"


def test_the_dockerfile_commands_parse() -> None:
    commands = [argv for run in instructions("RUN") for argv in shell_commands(run, lambda name: f"<{name}>")]
    assert commands, "the image build should run cifar-mlops once (finding the catalogue proves the install)"
    for argv in commands:
        parse(argv)
    assert entrypoint() == [PROGRAM]
    # `docker run IMAGE` alone: the help (parsing it would print it and exit)
    [default_args] = [json.loads(text) for text in instructions("CMD")]
    assert default_args == ["--help"] and "--help" in cli.main.context_settings["help_option_names"]


def every_use() -> list[tuple[str, list[str], str]]:
    """(where, argv, option) for every option every recipe passes."""
    docker = [argv for run in instructions("RUN") for argv in shell_commands(run, lambda name: f"<{name}>")]
    uses = [*recipes().items(), *((f"{DOCKERFILE.name} RUN", argv) for argv in docker)]
    return [(where, argv, token.partition("=")[0]) for where, argv in uses for token in argv if token.startswith("--")]


USES = every_use()


@pytest.mark.parametrize(("where", "argv", "option"), USES, ids=[f"{where}:{option}" for where, _, option in USES])
def test_renaming_an_option_the_recipes_use_fails_them(where: str, argv: list[str], option: str) -> None:
    parse(argv)  # as the CLI is
    with pytest.raises(AssertionError, match=re.escape(option)):
        parse(argv, with_option_renamed(option, f"{option}-renamed"))


def test_renaming_a_command_the_recipes_use_fails_them() -> None:
    for argv in recipes().values():
        name = argv[1]
        renamed = click.Group(PROGRAM, commands={n: c for n, c in cli.main.commands.items() if n != name})
        with pytest.raises(click.UsageError, match="No such command"):
            parse(argv, renamed)


# ---------------------------------------------------------------------------
# The Kubernetes Job and its Secret


def test_the_job_runs_n_identical_workers_of_one_gpu_each() -> None:
    for job in jobs():
        spec = job["spec"]
        assert isinstance(spec["parallelism"], int) and spec["parallelism"] >= 1
        assert spec["parallelism"] == spec["completions"], "N workers at once, and done when N have finished"
        for container in containers(job):
            resources = container["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) == 1, f"{container['name']}: one GPU per worker"
            if "nvidia.com/gpu" in resources.get("requests", {}):  # Kubernetes: requests == limits for GPUs
                assert int(resources["requests"]["nvidia.com/gpu"]) == 1
            assert container["image"].endswith(":gpu"), "the image built with EXTRA=gpu"


def test_a_preempted_worker_is_replaced_and_its_trial_asked_again() -> None:
    # restartPolicy Never: a failed pod is replaced by a new one (which fails the dead trial and asks again);
    # a disruption (preemption, eviction, a lost node) does not count against backoffLimit
    for job in jobs():
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        assert spec["backoffLimit"] >= 1
        rules = spec["podFailurePolicy"]["rules"]
        assert any(r["action"] == "Ignore" and {"type": "DisruptionTarget"} in [
            {"type": c["type"]} for c in r.get("onPodConditions", [])] for r in rules), rules


def secret() -> dict:
    [found] = [doc for doc in k8s_documents(SECRET) if doc.get("kind") == "Secret"]
    return found


def test_every_credential_comes_from_the_secret() -> None:
    example = secret()
    keys = set(example.get("stringData") or example.get("data") or {})
    for job in jobs():
        for container in containers(job):
            env = {e["name"]: e for e in container.get("env", [])}
            assert WORKER_KEYS <= set(env), f"the worker needs {sorted(WORKER_KEYS - set(env))}"
            for name, entry in env.items():
                if name in WORKER_KEYS or SECRET_NAME.search(name):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in entry, f"{name} must come from a secretKeyRef, not a literal"
                    assert ref["name"] == example["metadata"]["name"], f"{name}: another Secret than the example"
                    assert ref["key"] in keys, f"{name}: key {ref['key']!r} is not in {SECRET.name}"
                assert not PASSWORD_IN_URL.search(str(entry.get("value", ""))), f"{name}: a password in a URL"


def test_the_secret_example_and_the_env_file_hold_placeholders_only() -> None:
    values = secret()["stringData"]
    assert set(values) == WORKER_KEYS == env_file_keys(WORKER_ENV)
    env = dict(line.split("=", 1) for line in WORKER_ENV.read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    for source in (values, env):
        for key, value in source.items():
            if re.search("PASSWORD|USERNAME", key):
                assert value == "CHANGE-ME", f"{key}: a placeholder, not {value!r}"
            assert not PASSWORD_IN_URL.search(value), f"{key}: the password goes in PGPASSWORD, not the URL"
            assert "example" in value or value == "CHANGE-ME", f"{key}: {value!r} looks like a real value"


# ---------------------------------------------------------------------------
# The Slurm array


def test_the_slurm_array_has_the_size_it_says_and_one_gpu_per_worker() -> None:
    directives = sbatch_directives()
    assert directives["--gres"] == "gpu:1"
    match = re.fullmatch(r"0-(\d+)", directives["--array"])
    assert match, f"--array={directives['--array']}: a range 0-(N-1)"
    [comment] = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH --array")]
    said = re.search(r"#\s*(\d+) workers", comment)
    assert said, f"the --array line should say how many workers it runs: {comment!r}"
    assert int(match[1]) == int(said[1]) - 1, f"--array=0-{match[1]} is {int(match[1]) + 1} workers, not {said[1]}"
    assert "--requeue" in directives, "a preempted worker is queued again and rejoins the study"


def test_the_slurm_script_reads_credentials_from_the_environment_or_a_private_file() -> None:
    text = SBATCH.read_text()
    [keys] = re.findall(r'^KEYS="([\w ]+)"', text, re.MULTILINE)
    assert set(keys.split()) == WORKER_KEYS, "the keys it reads from the env file, and requires"
    assert "chmod 600" in text and "stat -c %a" in text, "it refuses a credentials file others can read"
    argv = sbatch_argv()
    assert not any(PASSWORD_IN_URL.search(word) for word in argv)
    for key in WORKER_KEYS - {"OPTUNA_STORAGE"}:  # the one on the command line holds no password
        assert f"<{key}>" not in argv, f"${key} is on the command line"


# ---------------------------------------------------------------------------
# The image


def test_the_image_installs_an_extra_of_pyproject() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    [arg] = [a for a in instructions("ARG") if a.startswith("EXTRA")]
    default = arg.partition("=")[2]
    assert default == "cpu" and default in extras, f"ARG {arg}: the default extra must be one of {sorted(extras)}"
    installs = [run for run in instructions("RUN") if re.search(r'pip install "\.\[\$\{EXTRA\}\]"', run)]
    assert installs, 'the image installs the project with its extra: pip install ".[${EXTRA}]"'
    # the build refuses what is not a TensorFlow extra (pip itself would only warn and install no TensorFlow)
    [allowed] = re.findall(r'case "\$EXTRA" in ([\w|]+)\)', installs[0])
    assert set(allowed.split("|")) == {"cpu", "gpu"} <= set(extras)
    for name in allowed.split("|"):
        assert any(req.startswith("tensorflow") for req in extras[name]), f"extra {name} installs no TensorFlow"


def test_the_image_matches_the_project() -> None:
    [base, *_] = instructions("FROM")
    version = re.fullmatch(r"python:(\d+\.\d+)-slim", base)
    assert version, f"FROM {base}"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{version[1]}.0")
    # a non-editable install reads the catalogue from where the repository was copied
    [workdir, *_] = instructions("WORKDIR")
    env = " ".join(instructions("ENV"))
    assert f"CIFAR_MLOPS_EXPERIMENTS={workdir}/experiments" in env
    user = instructions("USER")[-1].partition(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root user (runAsNonRoot can check it)"
    steps = dockerfile()
    last_install = max(i for i, (name, text) in enumerate(steps) if name == "RUN" and "pip install" in text)
    assert next(i for i, (name, _) in enumerate(steps) if name == "USER") > last_install, "installed as root"
    assert instructions("STOPSIGNAL") == ["SIGINT"], "stopping the container is Ctrl-C: the trial ends at once"


def test_the_build_context_leaves_out_local_state_and_credentials() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "mlruns", "mlflow.db"} <= patterns
    assert "deploy/worker.env" in patterns
    needed = {"pyproject.toml", "README.md", "cifar_mlops", "experiments"}
    assert not needed & patterns, "the image needs these"
