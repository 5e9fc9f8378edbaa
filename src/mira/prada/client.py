"""The device's HTTP client for the black-box server, counting what crosses the wire.

``BlackBoxClient`` sends JSON bodies it serialises itself, so ``bytes_sent`` is the exact
request body; ``bytes_received`` is the response body as read from the socket
(``httpx.Response.num_bytes_downloaded``, before any decompression; the decoded length for
transports that hand over a finished body, such as test doubles). HTTP headers are counted apart
(``header_bytes_sent``/``header_bytes_received``: the request line or status line and every header
line as HTTP/1.1 writes them, ``Name: value\r\n``, plus the blank line). Every call has a
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
    SessionDraft,
    SessionLogits,
    SessionOpened,
    decode_scores,
)


@dataclass
class Traffic:
    """Cumulative counters of one client (completed requests only)."""

    round_trips: int = 0
    bytes_sent: int = 0  # request bodies
    bytes_received: int = 0  # response bodies
    seconds: float = 0.0  # wall time spent waiting for the server
    header_bytes_sent: int = 0
    header_bytes_received: int = 0

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
    first_canonical: bool = True  # row 0 is the canonical computation (always, for /v1/draft)
    length: int | None = None  # sessions: the tokens the server has committed


def _head_bytes(start_line: str, raw_headers) -> int:
    return len(start_line) + 2 + sum(len(k) + 2 + len(v) + 2 for k, v in raw_headers) + 2


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

    def logits(self, prefixes: list[list[int]], top_k: int | None = None, encoding: Encoding | None = None) -> ScoreMatrix:
        """Next-token scores after each prefix: ``[len(prefixes), vocab or k]``."""
        resp = self._call("POST", "/v1/logits", {"prefixes": prefixes, "top_k": top_k,
                                                 "encoding": encoding or self.encoding},
                          LogitsResponse)
        return self._decode(resp.scores, expect_rows=len(prefixes))

    def draft(self, prefix: list[int], n: int, top_k: int | None = None, encoding: Encoding | None = None) -> Draft:
        """``n`` (or fewer, at EOS or the context end) greedy tokens and their scores, in one round trip."""
        resp = self._call("POST", "/v1/draft", {"prefix": prefix, "n": n, "top_k": top_k,
                                                "encoding": encoding or self.encoding},
                          DraftResponse)
        scores = self._decode(resp.scores, expect_rows=len(resp.tokens))
        if not resp.tokens or len(resp.tokens) > n:
            raise ServerFailure(f"the server drafted {len(resp.tokens)} tokens for n={n}", where=self.url)
        return Draft(tokens=resp.tokens, scores=scores, stop=resp.stop)

    # -- sessions (the server keeps the KV cache) -------------------------------------------
    def open_session(self, prefix: list[int], n: int | None = None, top_k: int | None = None,
                     encoding: Encoding | None = None) -> tuple[str, Draft | None]:
        """``(session_id, first draft or None)``: one round trip."""
        resp = self._call("POST", "/v1/sessions", {"prefix": prefix, "n": n, "top_k": top_k,
                                                   "encoding": encoding or self.encoding}, SessionOpened)
        draft = None if resp.draft is None else self._session_draft(resp.draft, n or 0)
        return resp.session_id, draft

    def session_draft(self, session_id: str, tokens: list[int], n: int, top_k: int | None = None,
                      encoding: Encoding | None = None) -> Draft:
        """Append ``tokens`` to the session and draft ``n`` from there."""
        resp = self._call("POST", f"/v1/sessions/{session_id}/draft",
                          {"tokens": tokens, "n": n, "top_k": top_k, "encoding": encoding or self.encoding},
                          SessionDraft)
        return self._session_draft(resp, n)

    def session_logits(self, session_id: str, tokens: list[int], canonical: bool = False, top_k: int | None = None,
                       encoding: Encoding | None = None) -> ScoreMatrix:
        """Append ``tokens``; the next-token scores (``canonical``: from one full forward)."""
        resp = self._call("POST", f"/v1/sessions/{session_id}/logits",
                          {"tokens": tokens, "canonical": canonical, "top_k": top_k,
                           "encoding": encoding or self.encoding}, SessionLogits)
        if canonical and not resp.canonical:
            raise ServerFailure("asked for a canonical row, got a cached one", where=self.url)
        return self._decode(resp.scores, expect_rows=1)

    def close_session(self, session_id: str) -> None:
        self._call("DELETE", f"/v1/sessions/{session_id}", None, None)

    def _session_draft(self, resp: SessionDraft, n: int) -> Draft:
        scores = self._decode(resp.scores, expect_rows=len(resp.tokens))
        if not resp.tokens or len(resp.tokens) > n:
            raise ServerFailure(f"the server drafted {len(resp.tokens)} tokens for n={n}", where=self.url)
        return Draft(tokens=resp.tokens, scores=scores, stop=resp.stop, first_canonical=resp.first_canonical,
                     length=resp.length)

    # -- plumbing -----------------------------------------------------------------------
    def _decode(self, scores, expect_rows: int) -> ScoreMatrix:
        try:
            matrix = decode_scores(scores)
        except ValueError as e:
            raise ServerFailure(f"malformed scores from the server: {e}", where=self.url) from e
        if matrix.rows != expect_rows:
            raise ServerFailure(f"expected {expect_rows} score rows, got {matrix.rows}", where=self.url)
        return matrix

    def _call(self, method: str, path: str, payload: dict | None, model: type[BaseModel] | None):
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
        req = resp.request
        self.traffic.header_bytes_sent += _head_bytes(f"{req.method} {req.url.raw_path.decode()} HTTP/1.1",
                                                      req.headers.raw)
        self.traffic.header_bytes_received += _head_bytes(f"HTTP/1.1 {resp.status_code} {resp.reason_phrase}",
                                                          resp.headers.raw)
        if resp.status_code >= 400:
            raise self._error(resp, path)
        if model is None:
            return None
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
