"""Progress lines on stderr, so stdout carries only results."""

from __future__ import annotations

import sys


def log(message: str, prefix: str = "cifar-mlops") -> None:
    print(f"[{prefix}] {message}", file=sys.stderr, flush=True)
