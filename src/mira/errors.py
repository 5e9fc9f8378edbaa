"""User-facing errors.

Every mistake in user input (a config field, a data file, a CLI flag) is raised as
``MiraError``. The CLI prints it as one line and exits with code 2; nothing written
before the error is touched.
"""
from __future__ import annotations


class MiraError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        self.message = message  # without ``where``
        super().__init__(f"{where}: {message}" if where else message)
