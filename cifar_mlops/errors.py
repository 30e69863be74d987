"""The one base class of every user-facing error, and helpers to word them.

A `UserError` is something the user can fix (a bad option, a missing file, an
unreachable store): the CLI prints its message as one line, without a
traceback, and exits with its `exit_code`. Anything else is a bug and keeps
its traceback. Each module names its own subclasses (`ConfigError`,
`DataError`, ...) so the reader sees what went wrong where.
"""

import re


class UserError(Exception):
    """What is wrong and what to do, in one line; `exit_code` 2 for bad input caught before any work."""

    exit_code = 1


class StoreUnavailable(UserError):
    """The MLflow tracking store (server, database or file) cannot be used; the message says what to do."""


def redact(url: str | None) -> str:
    """A storage URL fit to print and tag: any password replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url or "")


def first_line(err: BaseException, typed: bool = False, limit: int = 300) -> str:
    """The first line of an error's message (of the driver's error under a SQLAlchemy one), for one-line errors.

    An empty message gives the error's type name; `typed` puts the type name in front ("KeyError: 'x'").
    """
    text = str(getattr(err, "orig", None) or err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(err).__name__}: {line}" if typed else line
