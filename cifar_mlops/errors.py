"""Errors any command may raise that the CLI reports as one line, whichever command it was."""


class StoreUnavailable(RuntimeError):
    """The MLflow tracking server does not answer; the message says what to do."""
