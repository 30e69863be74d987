"""Errors any command may raise that the CLI reports as one line, whichever command it was."""


class StoreUnavailable(RuntimeError):
    """The MLflow tracking store (server, database or file) cannot be used; the message says what to do."""
