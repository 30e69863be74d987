"""MLproject mirrors the `cifar-mlops` commands one to one: for every entry point, its parameters are its
command's options and arguments (no more, no fewer), its command template uses exactly the declared
parameters, and defaults agree where both sides have one.

The click commands are read from `cli.main.commands`, by command and option names only, so the test
holds whatever cli.py's code looks like."""

from __future__ import annotations

import re
import shlex
from typing import Any

import click
import pytest
import yaml

from cifar_mlops import cli
from tests.conftest import REPO

ENTRY_POINTS: dict[str, dict] = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]

# Command options that an entry point takes in another form by design, so no parameter binds them:
# a repeatable `--set KEY=VALUE` cannot be one `-P` value, and every command that has it also has
# `--overrides 'K=V K=V'`, the same overrides as one string (the MLproject parameter).
TAKEN_IN_ANOTHER_FORM = {"set": "overrides"}
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def declared(entry: dict) -> dict[str, dict]:
    """MLproject parameters as {name: {"type": ..., "default"?: ...}} (`name: string` is shorthand)."""
    return {name: spec if isinstance(spec, dict) else {"type": spec}
            for name, spec in (entry.get("parameters") or {}).items()}


def user_params(command: click.Command) -> list[click.Parameter]:
    """The options and arguments a user passes (not --help, not hidden options)."""
    return [p for p in command.params if p.expose_value and not getattr(p, "hidden", False)]


def flag_names(param: click.Parameter) -> list[str]:
    return [*param.opts, *getattr(param, "secondary_opts", [])]


def plain_default(param: click.Parameter) -> Any:
    """The parameter's default if it has a plain one (click marks "none" as None or a sentinel)."""
    default = param.default
    return default if isinstance(default, (str, bool, int, float)) else None


def bindings(template: list[str], command: click.Command,
             parameters: dict[str, dict]) -> dict[str, tuple[click.Parameter, str]]:
    """MLproject parameter -> (the click parameter the template passes it to, how).

    `--name {p}` and `--name={p}`: the option --name; `--{p}`: one switch of a flag pair such as
    --latest/--best, the pair that has `--<default of p>`; a bare `{p}`: the next positional argument."""
    options = {name: p for p in user_params(command) if isinstance(p, click.Option) for name in flag_names(p)}
    arguments = iter(p for p in user_params(command) if isinstance(p, click.Argument))
    bound: dict[str, tuple[click.Parameter, str]] = {}

    def bind(name: str, param: click.Parameter | None, how: str, token: str) -> None:
        assert param is not None, f"{token!r} passes {{{name}}} to no option of `cifar-mlops {command.name}`"
        assert name not in bound, f"{{{name}}} is passed twice"
        bound[name] = (param, how)

    tokens = iter(template)
    for token in tokens:
        if match := re.fullmatch(r"--\{(\w+)\}", token):
            name = match[1]
            default = parameters.get(name, {}).get("default")
            assert default, f"{token}: a switch parameter needs a default that names one of its switches"
            pair = options.get(f"--{default}")
            bind(name, pair if pair is not None and pair.secondary_opts else None, "switch", token)
        elif match := re.fullmatch(r"(--[\w-]+)=\{(\w+)\}", token):
            bind(match[2], options.get(match[1]), "value", token)
        elif token.startswith("--"):
            value = next(tokens, "")
            match = re.fullmatch(r"\{(\w+)\}", value)
            assert match, f"{token} is followed by {value!r}, not by one {{parameter}}"
            bind(match[1], options.get(token), "value", token)
        elif match := re.fullmatch(r"\{(\w+)\}", token):
            bind(match[1], next(arguments, None), "argument", token)
        else:
            raise AssertionError(f"unexpected token {token!r} in the command template")
    return bound


def comparable(param: click.Parameter, value: Any) -> Any:
    """A default as the command would see it, without calling types that import heavy modules."""
    kind = param.type
    if isinstance(kind, click.types.BoolParamType):
        return kind.convert(value, param, None)
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):  # ranges included
        return float(value)
    return str(value)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_mirrors_its_command(name: str) -> None:
    entry = ENTRY_POINTS[name]
    parameters = declared(entry)
    template = shlex.split(entry["command"])
    assert template[:2] == ["cifar-mlops", name], f"entry point {name} must run `cifar-mlops {name} ...`"
    command = cli.main.commands.get(name)
    assert command is not None, f"MLproject entry point {name} has no `cifar-mlops {name}` command"

    # every {placeholder} is declared, every declared parameter is used, once
    used = PLACEHOLDER.findall(entry["command"])
    assert sorted(set(used) - set(parameters)) == [], "placeholders without a declared parameter"
    assert sorted(set(parameters) - set(used)) == [], "declared parameters that the command never gets"
    assert len(used) == len(set(used)), f"a parameter is passed twice: {used}"

    bound = bindings(template[2:], command, parameters)
    for parameter, (param, how) in bound.items():
        flag = f"--{parameter.replace('_', '-')}"
        if how == "value":  # data_dir -> --data-dir
            assert flag in param.opts, f"{{{parameter}}} is passed to {param.opts[0]}, not to {flag}"
        elif how == "argument":  # model -> MODEL
            assert parameter.upper() in (param.name.upper(), (param.metavar or "").upper()), (parameter, param.name)

    # one to one: each option and argument of the command is bound by exactly one parameter
    by_param = {param.name: parameter for parameter, (param, _) in bound.items()}
    missing = []
    for param in user_params(command):
        if param.name in by_param:
            continue
        option = param.opts[0].lstrip("-").replace("-", "_")
        if option in TAKEN_IN_ANOTHER_FORM:
            assert TAKEN_IN_ANOTHER_FORM[option] in parameters, f"{param.opts[0]} is taken as no parameter"
            continue
        missing.append(param.opts[0])
    assert missing == [], f"options of `cifar-mlops {name}` that MLproject cannot pass"

    for parameter, (param, how) in bound.items():
        spec = parameters[parameter]
        required = getattr(param, "required", False)
        # a parameter that MLflow may leave out has a default, so the option must not be required, and back
        assert ("default" not in spec) == required, (
            f"{parameter}: {'no' if 'default' not in spec else 'a'} default in MLproject, "
            f"but {param.opts[0]} is {'' if required else 'not '}required")
        if spec.get("type") in ("int", "float"):
            assert isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)), (
                f"{parameter} is {spec['type']} in MLproject, {param.type.name} in the command")
        if "default" not in spec or plain_default(param) is None:
            continue
        default, theirs = spec["default"], plain_default(param)
        if how == "switch":  # default `latest` -> --latest, the switch the option is on by default
            on = param.opts if theirs else param.secondary_opts
            assert f"--{default}" in on, f"{parameter} defaults to --{default}, the command to {on}"
        else:
            assert comparable(param, default) == comparable(param, theirs), (
                f"{parameter}: MLproject default {default!r}, {param.opts[0]} default {theirs!r}")


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_a_choice_parameter_lists_the_choices_its_option_takes(name: str) -> None:
    # MLproject has no choice type: a parameter's comment names the choices (`# tpe | random; ...`), and they are
    # the ones the option takes, which come from the module owning them (tune.SAMPLERS, report.FORMATS, ...)
    lines = (REPO / "MLproject").read_text().splitlines()
    start = lines.index(f"  {name}:")
    block = lines[start + 1:next((i for i in range(start + 1, len(lines)) if re.match(r"  \w", lines[i])), len(lines))]
    command = cli.main.commands[name]
    template = shlex.split(ENTRY_POINTS[name]["command"])[2:]  # after `cifar-mlops NAME`
    for parameter, (param, how) in bindings(template, command, declared(ENTRY_POINTS[name])).items():
        if how == "switch":
            choices = [opt.lstrip("-") for opt in flag_names(param)]
        elif isinstance(param.type, click.Choice):
            choices = list(param.type.choices)
        else:
            continue
        [line] = [line for line in block if line.strip().startswith(f"{parameter}:")]
        comment = line.partition("#")[2].partition(";")[0]  # "# a | b; what they mean"
        assert [c.strip() for c in comment.split("|")] == choices, (name, parameter, comment)
