"""The device's HTTP client for the black-box server, counting what crosses the wire.

``BlackBoxClient`` sends JSON bodies it serialises itself, so ``bytes_sent`` is the exact
request body; ``bytes_received`` is the response body as read from the socket
(``httpx.Response.num_bytes_downloaded``, before any decompression; the decoded length for
transports that hand over a finished body, such as test doubles). HTTP headers are not counted. Every call has a
timeout (``httpx.Timeout``), so a hung server raises ``ServerTimeout`` instead of hanging;
a dead one raises ``ServerUnavailable``; a 4xx answer raises ``ServerRejected`` (or its
subclasses ``AuthenticationError`` and ``ContextLimitError``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import httpx
from pydantic import BaseModel, ValidationError

from mira.prada.errors import (
    AuthenticationError,
    ContextLimitError,
    PradaError,
    ServerFailure,
    ServerRejected,
    ServerTimeout,
    ServerUnavailable,
)
from mira.prada.protocol import (
    DraftResponse,
    Encoding,
    Health,
    LogitsResponse,
    ScoreMatrix,
    decode_scores,
)


@dataclass
class Traffic:
    """Cumulative counters of one client (completed requests only)."""

    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0  # wall time spent waiting for the server

    def minus(self, before: Traffic) -> Traffic:
        return Traffic(**{k: v - getattr(before, k) for k, v in asdict(self).items()})

    def copy(self) -> Traffic:
        return Traffic(**asdict(self))


@dataclass
class Draft:
    """A ``/v1/draft`` answer: the server's greedy tokens and the scores at each position."""

    tokens: list[int]
    scores: ScoreMatrix
    stop: str


class BlackBoxClient:
    """``health()``, ``logits(prefixes)`` and ``draft(prefix, n)`` against one server URL."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, encoding: Encoding = "base64",
                 transport: httpx.BaseTransport | None = None):
        if timeout <= 0:
            raise PradaError(f"timeout must be positive, got {timeout}", where="--timeout")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.encoding: Encoding = encoding
        self.traffic = Traffic()
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                  headers={"Authorization": f"Bearer {api_key}"}, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BlackBoxClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the three calls ----------------------------------------------------------------
    def health(self) -> Health:
        return self._call("GET", "/health", None, Health)

    def logits(self, prefixes: list[list[int]], top_k: int | None = None) -> ScoreMatrix:
        """Next-token scores after each prefix: ``[len(prefixes), vocab or k]``."""
        resp = self._call("POST", "/v1/logits", {"prefixes": prefixes, "top_k": top_k, "encoding": self.encoding},
                          LogitsResponse)
        return self._decode(resp.scores, expect_rows=len(prefixes))

    def draft(self, prefix: list[int], n: int, top_k: int | None = None) -> Draft:
        """``n`` (or fewer, at EOS or the context end) greedy tokens and their scores, in one round trip."""
        resp = self._call("POST", "/v1/draft", {"prefix": prefix, "n": n, "top_k": top_k, "encoding": self.encoding},
                          DraftResponse)
        scores = self._decode(resp.scores, expect_rows=len(resp.tokens))
        if not resp.tokens or len(resp.tokens) > n:
            raise ServerFailure(f"the server drafted {len(resp.tokens)} tokens for n={n}", where=self.url)
        return Draft(tokens=resp.tokens, scores=scores, stop=resp.stop)

    # -- plumbing -----------------------------------------------------------------------
    def _decode(self, scores, expect_rows: int) -> ScoreMatrix:
        try:
            matrix = decode_scores(scores)
        except ValueError as e:
            raise ServerFailure(f"malformed scores from the server: {e}", where=self.url) from e
        if matrix.rows != expect_rows:
            raise ServerFailure(f"expected {expect_rows} score rows, got {matrix.rows}", where=self.url)
        return matrix

    def _call(self, method: str, path: str, payload: dict | None, model: type[BaseModel]):
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        t0 = time.perf_counter()
        try:
            resp = self._http.request(method, path, content=body if payload is not None else None, headers=headers)
        except httpx.TimeoutException as e:
            raise ServerTimeout(f"no answer from {self.url}{path} within {self.timeout:g}s ({type(e).__name__})",
                                where="server") from e
        except httpx.TransportError as e:
            raise ServerUnavailable(f"cannot reach {self.url}{path}: {type(e).__name__}: {e or 'connection lost'}",
                                    where="server") from e
        self.traffic.round_trips += 1
        self.traffic.bytes_sent += len(body)
        self.traffic.bytes_received += resp.num_bytes_downloaded or len(resp.content)
        self.traffic.seconds += time.perf_counter() - t0
        if resp.status_code >= 400:
            raise self._error(resp, path)
        try:
            return model.model_validate_json(resp.content)
        except ValidationError as e:
            raise ServerFailure(f"malformed answer to {path}: {str(e).splitlines()[0]}", where=self.url) from e

    def _error(self, resp: httpx.Response, path: str) -> PradaError:
        try:
            detail = resp.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        code = detail.get("code", "error") if isinstance(detail, dict) else "error"
        message = detail.get("message", str(detail)) if isinstance(detail, dict) else (str(detail) if detail else
                                                                                      resp.text[:200])
        text = f"{resp.status_code} from {path}: {message}"
        if resp.status_code == 401:
            return AuthenticationError(text, resp.status_code, code, where="server")
        if resp.status_code >= 500:
            return ServerFailure(text, where="server")
        if code == "context_exceeded":
            return ContextLimitError(text, resp.status_code, code, where="server")
        return ServerRejected(text, resp.status_code, code, where="server")
