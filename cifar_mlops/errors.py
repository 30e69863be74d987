"""Errors any command may raise that the CLI reports as one line, whichever command it was."""

import re


class StoreUnavailable(RuntimeError):
    """The MLflow tracking store (server, database or file) cannot be used; the message says what to do."""


def redact(url: str | None) -> str:
    """A storage URL fit to print and tag: any password replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url or "")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (of the driver's error under a SQLAlchemy one), for one-line errors."""
    text = str(getattr(err, "orig", None) or err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
