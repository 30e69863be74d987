"""Helpers that several test modules share (no test module imports another)."""

from __future__ import annotations

import json
import re
import tomllib

import click

from cifar_mlops import cli
from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROGRAM = "cifar-mlops"

# `tune` on tiny data: one epoch per trial (test_tune, test_dashboard)
TINY = {"data.synthetic_train_pool": 168, "data.val_size": 40, "data.synthetic_test_pool": 40,
        "search.epochs.high": 1, "search.batch_size": [32]}
TINY_SET = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={json.dumps(value)}")]

KERAS_EPOCH = re.compile(r"^Epoch \d+/\d+$|\d+/\d+ - \d+m?s - .*loss", re.MULTILINE)  # fit(verbose=2)'s lines


def bar_lines(stderr: str, command: str, unit: str = "runs") -> list[re.Match]:
    """The bar's lines in a log: `[cifar-mlops COMMAND] DONE/TOTAL UNIT done | elapsed T, left ~T | WHAT`."""
    return list(re.finditer(rf"^\[cifar-mlops {command}\] (\d+)/(\d+) {unit} done \| elapsed (\d\d:\d\d), "
                            r"left ~(\d\d:\d\d|\?) \| (.+)$", stderr, re.MULTILINE))


# ---------------------------------------------------------------------------
# Parsing a command line with the CLI's own parser (the deploy recipes, the TLS proxy example)


def option_names(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}


def parse(argv: list[str], group: click.Group = cli.main) -> tuple[click.Command, dict]:
    """`cifar-mlops SUBCOMMAND ARGS...` parsed as click would before running it (types and choices
    converted, required options checked); return the subcommand and its parameters' values. Fails, naming
    it, on an option that the subcommand does not have."""
    assert argv and argv[0] == PROGRAM, f"not a {PROGRAM} command: {argv}"
    assert PROGRAM in PYPROJECT["project"]["scripts"], f"{PROGRAM} is no console script of pyproject.toml"
    with group.make_context(PROGRAM, list(argv[1:]), resilient_parsing=False) as ctx:
        rest = ctx.args  # what follows the subcommand's name
        name = argv[len(argv) - len(rest) - 1]
        _, command, args = group.resolve_command(ctx, [name, *rest])
        assert command is not None and not command.hidden, f"`{PROGRAM} {name}` is no public command"
        unknown = [a.partition("=")[0] for a in args if a.startswith("--")
                   and a.partition("=")[0] not in option_names(command)]
        assert not unknown, f"`{PROGRAM} {name}` has no option {', '.join(unknown)} (has {sorted(option_names(command))})"
        with command.make_context(name, list(args), parent=ctx) as sub:
            return command, dict(sub.params)


def compute_measure() -> tuple[str, str]:
    """(the fit time that counts for --budget and the minutes, its unit) of a run trained here: GPU seconds where the
    backend sees a GPU (the runs train on it), else CPU seconds."""
    from cifar_mlops import backend

    return ("fit_gpu_seconds", "GPU-minutes") if backend.gpu_count() else ("fit_cpu_seconds", "CPU-minutes")
