"""Errors of the device-server protocol.

Every failure a user can meet while generating is a ``PradaError`` (a ``MiraError``, so
the CLI prints it as one line with exit code 2). When it happens in the middle of a
generation, the decoder re-raises it with the progress so far: ``text``, ``token_ids``
and ``metrics`` are filled in and the message ends with the text generated so far.
"""
from __future__ import annotations

from typing import Any

from mira.errors import MiraError


class PradaError(MiraError):
    """Base class. ``text``/``token_ids``: what was generated before the failure."""

    text: str = ""
    token_ids: list[int]
    metrics: Any = None

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message, where=where)
        self.token_ids = []

    def with_progress(self, text: str, token_ids: list[int], metrics: Any = None) -> PradaError:
        """A copy of this error that carries (and reports) the partial generation."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.text, new.token_ids, new.metrics = text, list(token_ids), metrics
        new.args = (f"{self.args[0]} (after {len(token_ids)} generated tokens; text so far: {text!r})",)
        return new


class ServerUnavailable(PradaError):
    """The server cannot be reached, or closed the connection (it died)."""


class ServerTimeout(PradaError):
    """The server did not answer within the client's timeout."""


class ServerFailure(PradaError):
    """The server answered with a 5xx status or a malformed body."""


class ServerRejected(PradaError):
    """The server refused the request (4xx); ``status`` and ``code`` say why."""

    def __init__(self, message: str, status: int, code: str = "invalid_request", where: str | None = None):
        super().__init__(message, where=where)
        self.status = status
        self.code = code


class AuthenticationError(ServerRejected):
    """401: missing or wrong API key."""


class ContextLimitError(ServerRejected):
    """The sequence no longer fits the server's (or the proxy's) context window."""
