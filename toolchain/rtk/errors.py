"""User-facing errors: one clear line, exit code 1, never a traceback."""
from __future__ import annotations

import click


class RtkError(click.ClickException):
    """An error caused by the user's input (a file, a field, a model)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
