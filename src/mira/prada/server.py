"""The black-box provider: a causal LM behind an HTTP API that shares only scores.

``mira serve MODEL_DIR --port P`` runs ``create_app`` under uvicorn in its own process.
The API (wire format in ``mira.prada.protocol``):

* ``GET /health``: public facts (vocabulary size, context length, limits); no key needed.
* ``POST /v1/logits``: next-token scores of a batch of prefixes, full-vocabulary logits or
  only the top-k log-probabilities when the request sets ``top_k``.
* ``POST /v1/draft``: from one prefix, ``n`` greedy tokens (KV cache, one request) and the
  scores at each of the ``n`` positions. It stops early after an end-of-sequence token,
  or when the next position would not fit in the context (``stop`` says which).
* ``POST /v1/sessions``, ``POST /v1/sessions/{id}/draft``, ``POST /v1/sessions/{id}/logits``,
  ``DELETE /v1/sessions/{id}``: the same with the KV cache kept on the server between
  requests (``mira.prada.sessions``), so that a request carries only the new tokens.

Every POST and DELETE needs ``Authorization: Bearer <key>``; the keys come from an environment
variable (``MIRA_API_KEY`` by default; several keys separated by commas) and are compared in
constant time. A session belongs to the key that opened it. Requests are
bounded: body size (413), batch size, prefix length (at most the model's context),
``n`` and ``top_k`` (422), token ids in ``[0, vocab_size)`` (422). No weights, configs
or hidden states are ever returned.

The model runs single-threaded (``MIRA_THREADS``, default 1) and one request at a time:
FastAPI runs the handlers in a thread pool, so a lock serialises every model call.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
from dataclasses import dataclass

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from mira.errors import MiraError
from mira.prada.protocol import (
    DraftRequest,
    DraftResponse,
    Health,
    LogitsRequest,
    LogitsResponse,
    Scores,
    SessionDraft,
    SessionDraftRequest,
    SessionLogits,
    SessionLogitsRequest,
    SessionOpen,
    SessionOpened,
    encode_scores,
)
from mira.prada.sessions import Session, SessionStore, crop_cache, owner_of

DEFAULT_KEY_ENV = "MIRA_API_KEY"
UNKNOWN_SESSION = "no such session for this key (it may have expired, been evicted or closed)"


@dataclass(frozen=True)
class ServerLimits:
    max_batch: int = 16
    max_draft: int = 64
    max_body_bytes: int = 1 << 20
    max_depth: int = 8  # JSON nesting (requests need 3)
    max_concurrent: int = 4  # requests in flight per API key; more get 429
    body_timeout: float = 2.0  # seconds to receive a whole body; slower gets 408
    session_ttl: float = 300.0  # idle seconds before a session is dropped
    max_sessions: int = 64  # sessions in all
    max_sessions_per_key: int = 8
    max_session_bytes: int = 512 << 20  # KV caches of all sessions together

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_draft", "max_body_bytes", "max_depth", "max_concurrent", "max_sessions",
                     "max_sessions_per_key", "max_session_bytes"):
            if getattr(self, name) < 1:
                raise MiraError(f"{name} must be at least 1, got {getattr(self, name)}", where=f"--{name.replace('_', '-')}")
        if not self.body_timeout > 0:
            raise MiraError(f"body_timeout must be positive, got {self.body_timeout}", where="--body-timeout")
        if not self.session_ttl > 0:
            raise MiraError(f"session_ttl must be positive, got {self.session_ttl}", where="--session-ttl")


def check_api_key(key: str, where: str = "api key") -> str:
    """The key, or a ``MiraError`` when it is empty or only whitespace."""
    if not key or not key.strip():
        raise MiraError("the API key is empty or only whitespace", where=where)
    return key


def api_keys(keys) -> list[str]:
    """A list of checked keys from one key, a comma-separated string of keys, or a sequence."""
    items = keys.split(",") if isinstance(keys, str) else list(keys)
    if not items:
        raise MiraError("no API key", where="api key")
    return [check_api_key(k) for k in items]


def match_key(given: bytes, keys: list[bytes]) -> bytes | None:
    """The key equal to ``given`` (every key compared in constant time), or None."""
    found = None
    for key in keys:
        if hmac.compare_digest(given, key):
            found = key
    return found


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether ``body`` nests arrays/objects deeper than ``limit`` (a scan, no parsing; strings skipped)."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class Guard:
    """ASGI middleware run before FastAPI sees a POST: auth first (no body byte is read
    without a valid key), then Content-Length, a per-key concurrency limit, the body read
    under a deadline, and a nesting bound. Every refusal is ``{"detail": {"code", "message"}}``."""

    def __init__(self, app, api_key, limits: ServerLimits):
        self.app = app
        self.keys = [k.encode() for k in api_keys(api_key)]
        self.limits = limits
        self.in_flight: dict[bytes, int] = {}

    @staticmethod
    async def _send_error(send, status: int, code: str, message: str, close: bool = False) -> None:
        body = json.dumps({"detail": {"code": code, "message": message}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status == 429:
            headers.append((b"retry-after", b"1"))
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "DELETE"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        key = match_key(given.strip(), self.keys) if scheme.lower() == b"bearer" else None
        if key is None:
            return await self._send_error(send, 401, "unauthorized", "missing or wrong API key")
        if scope["method"] == "DELETE":  # no body
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is None:
            return await self._send_error(send, 411, "length_required", "send a Content-Length header")
        if not length.isdigit() or int(length) > self.limits.max_body_bytes:
            return await self._send_error(send, 413, "body_too_large",
                                          f"request body over {self.limits.max_body_bytes} bytes")
        if self.in_flight.get(key, 0) >= self.limits.max_concurrent:
            return await self._send_error(send, 429, "too_many_requests",
                                          f"more than {self.limits.max_concurrent} requests in flight for this key")
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            try:
                body = await asyncio.wait_for(self._read(receive, int(length)), self.limits.body_timeout)
            except asyncio.TimeoutError:
                return await self._send_error(send, 408, "body_timeout",
                                              f"the body did not arrive within {self.limits.body_timeout:g}s",
                                              close=True)
            if body is None:
                return await self._send_error(send, 400, "bad_length", "the body does not match its Content-Length",
                                              close=True)
            if json_depth_exceeds(body, self.limits.max_depth):
                return await self._send_error(send, 422, "too_deep",
                                              f"JSON nested deeper than {self.limits.max_depth} levels")
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.in_flight[key] -= 1

    @staticmethod
    async def _read(receive, length: int) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > length:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks) if size == length else None


class RequestError(Exception):
    """A bad request: becomes ``{"detail": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class BlackBoxModel:
    """The served model and its one lock; validates token ids and lengths."""

    def __init__(self, model, limits: ServerLimits):
        self.model = model
        self.limits = limits
        self.sessions = SessionStore(ttl=limits.session_ttl, max_sessions=limits.max_sessions,
                                     max_per_key=limits.max_sessions_per_key, max_bytes=limits.max_session_bytes)
        self.vocab_size = int(model.config.vocab_size)
        self.context_length = int(model.config.max_position_embeddings)
        self.eos_ids = _eos_ids(model)
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()

    def health(self) -> Health:
        return Health(status="ok", model_type=str(self.model.config.model_type), vocab_size=self.vocab_size,
                      context_length=self.context_length, eos_token_ids=self.eos_ids,
                      max_batch=self.limits.max_batch, max_draft=self.limits.max_draft, sessions=True,
                      session_ttl=self.limits.session_ttl, max_sessions_per_key=self.limits.max_sessions_per_key)

    # -- validation --------------------------------------------------------------------
    def check_prefix(self, prefix: list[int], where: str) -> None:
        if not prefix:
            raise RequestError(422, "empty_prefix", f"{where} is empty; send at least one token (e.g. BOS)")
        if len(prefix) > self.context_length:
            raise RequestError(422, "context_exceeded",
                               f"{where} has {len(prefix)} tokens, more than the model's context of "
                               f"{self.context_length}")
        bad = next((t for t in prefix if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(422, "unknown_token", f"{where} contains token id {bad}, outside the vocabulary "
                                                     f"[0, {self.vocab_size})")

    def check_tokens(self, tokens: list[int], where: str) -> None:
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(422, "unknown_token", f"{where} contains token id {bad}, outside the vocabulary "
                                                     f"[0, {self.vocab_size})")

    def check_n(self, n: int) -> None:
        if not 1 <= n <= self.limits.max_draft:
            raise RequestError(422, "bad_n", f"n must be in [1, {self.limits.max_draft}], got {n}")

    def check_top_k(self, top_k: int | None) -> None:
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise RequestError(422, "bad_top_k", f"top_k must be in [1, {self.vocab_size}], got {top_k}")

    # -- model calls (under the lock) -------------------------------------------------------
    @torch.no_grad()
    def next_logits(self, prefixes: list[list[int]]) -> torch.Tensor:
        """``[batch, vocab]`` logits after each prefix (right-padded batch, one forward)."""
        lengths = [len(p) for p in prefixes]
        width = max(lengths)
        ids = torch.zeros(len(prefixes), width, dtype=torch.long)
        mask = torch.zeros(len(prefixes), width, dtype=torch.long)
        for row, p in enumerate(prefixes):
            ids[row, : len(p)] = torch.tensor(p)
            mask[row, : len(p)] = 1
        with self.lock:
            if len(prefixes) == 1:
                return last_row(self._full_forward(prefixes[0]))[None]
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        last = torch.tensor(lengths) - 1
        return logits[torch.arange(len(prefixes)), last.to(logits.device)].float().cpu()

    def _full_forward(self, prefix: list[int]):
        """The canonical computation: one forward of the whole prefix (with a cache for a draft to go on)."""
        return self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)

    def _step(self, token: int, cache):
        """Feed one token after ``cache``; the model's output (its cache and last row)."""
        return self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=cache, use_cache=True)

    def _greedy(self, row: torch.Tensor, length: int, n: int, step) -> tuple[list[int], torch.Tensor, str]:
        """Greedy tokens from ``row``, the logits after a sequence of ``length`` tokens: up to ``n``,
        ending at EOS or where the next forward would not fit the context; ``step(token)`` feeds a
        token and returns the next row. ``(tokens, [m, vocab] logits, stop)``."""
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        while True:
            token = int(row.argmax())
            tokens.append(token)
            rows.append(row)
            if token in self.eos_ids:
                return tokens, torch.stack(rows), "eos"
            if len(tokens) == n:
                return tokens, torch.stack(rows), "length"
            if length + len(tokens) > self.context_length:
                return tokens, torch.stack(rows), "context"
            row = step(token)

    @torch.no_grad()
    def draft(self, prefix: list[int], n: int) -> tuple[list[int], torch.Tensor, str]:
        """``n`` greedy tokens after ``prefix`` with the KV cache; ``(tokens, [m, vocab] logits, stop)``."""
        with self.lock:
            out = self._full_forward(prefix)  # row 0 is bit-identical to /v1/logits of this prefix
            cache = out.past_key_values

            def step(token: int) -> torch.Tensor:
                nonlocal cache
                o = self._step(token, cache)
                cache = o.past_key_values
                return last_row(o)

            return self._greedy(last_row(out), len(prefix), n, step)

    # -- sessions (under the lock) -------------------------------------------------------------
    def session(self, owner: str, sid: str) -> Session:
        s = self.sessions.get(owner, sid)
        if s is None:
            raise RequestError(404, "unknown_session", UNKNOWN_SESSION)
        return s

    def _fit(self, s: Session) -> None:
        if not self.sessions.fit(s):
            raise RequestError(413, "session_too_large", f"the session needs more than the server's "
                                                         f"{self.limits.max_session_bytes} bytes of KV cache")

    @torch.no_grad()
    def open_session(self, owner: str, prefix: list[int]) -> Session:
        """Prefill ``prefix`` with the canonical computation; a new session of ``owner``."""
        out = self._full_forward(prefix)
        s = self.sessions.add(owner, prefix, out.past_key_values, last_row(out), canonical=True)
        if s.id not in self.sessions.sessions:
            raise RequestError(413, "session_too_large", f"the prefix needs more than the server's "
                                                         f"{self.limits.max_session_bytes} bytes of KV cache")
        return s

    @torch.no_grad()
    def advance(self, s: Session, tokens: list[int], canonical: bool = False) -> None:
        """Commit ``tokens`` after the session's committed sequence; reuse the cache as far as
        it agrees (draft tokens the client kept), feed the rest in one forward."""
        new = s.ids[: s.committed] + list(tokens)
        if len(new) > self.context_length:
            raise RequestError(422, "context_exceeded", f"the session would hold {len(new)} tokens, more than the "
                                                        f"model's context of {self.context_length}")
        if canonical:
            out = self._full_forward(new)
            s.cache, s.last, s.last_canonical = out.past_key_values, last_row(out), True
        elif new != s.ids:
            same = 0
            for a, b in zip(new, s.ids):
                if a != b:
                    break
                same += 1
            keep = same if same < len(new) else same - 1  # something must be fed to get the last row
            crop_cache(s.cache, keep)
            out = self.model(input_ids=torch.tensor([new[keep:]], device=self.device), past_key_values=s.cache,
                             use_cache=True)
            s.cache, s.last, s.last_canonical = out.past_key_values, last_row(out), False
        s.ids, s.committed = new, len(new)
        self._fit(s)

    @torch.no_grad()
    def session_draft(self, s: Session, n: int) -> tuple[list[int], torch.Tensor, str, bool]:
        """``n`` greedy tokens from where the session stands; ``(tokens, logits, stop, first_canonical)``."""
        first_canonical = s.last_canonical

        def step(token: int) -> torch.Tensor:
            out = self._step(token, s.cache)
            s.cache, s.last, s.last_canonical = out.past_key_values, last_row(out), False
            s.ids.append(token)
            return s.last

        tokens, rows, stop = self._greedy(s.last, len(s.ids), n, step)
        self._fit(s)
        return tokens, rows, stop, first_canonical


def last_row(out) -> torch.Tensor:
    """The logits after the last position of a one-sequence model output, in float32 on the CPU."""
    return out.logits[0, -1].float().cpu()


def top_k_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, ids)``: the ``k`` largest log-probabilities of each row, in decreasing order."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return values, ids


def create_app(model, api_key, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The FastAPI app serving ``model`` (already loaded, frozen, in eval mode). ``api_key``:
    one key, several separated by commas, or a list; each key owns its own sessions."""
    keys = [k.encode() for k in api_keys(api_key)]
    box = BlackBoxModel(model, limits)
    app = FastAPI(title="mira black-box LLM", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.box = box

    def error(status: int, code: str, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError):
        return error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, "invalid_request", f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")))

    def authorized(request: Request) -> str:  # the Guard checked it already; kept as a second lock
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        key = match_key(given.strip().encode(), keys) if scheme.lower() == "bearer" else None
        if key is None:
            raise RequestError(401, "unauthorized", "missing or wrong API key")
        return owner_of(key)

    def scores(values: torch.Tensor, top_k: int | None, encoding) -> Scores:
        ids = None
        if top_k is not None:
            values, ids = top_k_logprobs(values, top_k)
        try:
            return encode_scores(values, ids, encoding)
        except ValueError as e:
            raise RequestError(422, "unencodable", f"{encoding}: {e}") from e

    @app.get("/health")
    def health() -> Health:
        return box.health()

    @app.post("/v1/logits", dependencies=[Depends(authorized)])
    def logits(req: LogitsRequest) -> LogitsResponse:
        if not 1 <= len(req.prefixes) <= limits.max_batch:
            raise RequestError(422, "bad_batch", f"send 1 to {limits.max_batch} prefixes, got {len(req.prefixes)}")
        for i, prefix in enumerate(req.prefixes):
            box.check_prefix(prefix, f"prefixes[{i}]")
        box.check_top_k(req.top_k)
        values = box.next_logits(req.prefixes)
        return LogitsResponse(scores=scores(values, req.top_k, req.encoding))

    @app.post("/v1/draft", dependencies=[Depends(authorized)])
    def draft(req: DraftRequest) -> DraftResponse:
        box.check_prefix(req.prefix, "prefix")
        if not 1 <= req.n <= limits.max_draft:
            raise RequestError(422, "bad_n", f"n must be in [1, {limits.max_draft}], got {req.n}")
        box.check_top_k(req.top_k)
        tokens, values, stop = box.draft(req.prefix, req.n)
        return DraftResponse(tokens=tokens, stop=stop, scores=scores(values, req.top_k, req.encoding))

    # -- sessions ---------------------------------------------------------------------------
    def session_draft(s: Session, n: int, top_k, encoding) -> SessionDraft:
        tokens, values, stop, first = box.session_draft(s, n)
        return SessionDraft(length=s.committed, tokens=tokens, stop=stop, first_canonical=first,
                            scores=scores(values, top_k, encoding))

    @app.post("/v1/sessions")
    def open_session(req: SessionOpen, owner: str = Depends(authorized)) -> SessionOpened:
        box.check_prefix(req.prefix, "prefix")
        if req.n is not None:
            box.check_n(req.n)
        box.check_top_k(req.top_k)
        with box.lock:
            s = box.open_session(owner, req.prefix)
            draft = None if req.n is None else session_draft(s, req.n, req.top_k, req.encoding)
        return SessionOpened(session_id=s.id, length=s.committed, expires_in=limits.session_ttl, draft=draft)

    @app.post("/v1/sessions/{sid}/draft")
    def draft_in_session(sid: str, req: SessionDraftRequest, owner: str = Depends(authorized)) -> SessionDraft:
        box.check_tokens(req.tokens, "tokens")
        box.check_n(req.n)
        box.check_top_k(req.top_k)
        with box.lock:
            s = box.session(owner, sid)
            box.advance(s, req.tokens)
            return session_draft(s, req.n, req.top_k, req.encoding)

    @app.post("/v1/sessions/{sid}/logits")
    def logits_in_session(sid: str, req: SessionLogitsRequest, owner: str = Depends(authorized)) -> SessionLogits:
        box.check_tokens(req.tokens, "tokens")
        box.check_top_k(req.top_k)
        with box.lock:
            s = box.session(owner, sid)
            box.advance(s, req.tokens, canonical=req.canonical)
            return SessionLogits(length=s.committed, canonical=s.last_canonical,
                                 scores=scores(s.last[None], req.top_k, req.encoding))

    @app.delete("/v1/sessions/{sid}", status_code=204, dependencies=[])
    def close_session(sid: str, owner: str = Depends(authorized)) -> Response:
        with box.lock:
            if not box.sessions.close(owner, sid):
                raise RequestError(404, "unknown_session", UNKNOWN_SESSION)
        return Response(status_code=204)

    app.add_middleware(Guard, api_key=api_key, limits=limits)
    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, key_env: str = DEFAULT_KEY_ENV,
          limits: ServerLimits = ServerLimits(), dtype: str = "float32", log=print) -> None:
    """Load ``model_dir`` and serve it until interrupted (blocking)."""
    import uvicorn

    from mira.models.loader import load_base

    api_key = os.environ.get(key_env, "")
    if not api_key.strip() or not all(k.strip() for k in api_key.split(",")):
        raise MiraError(f"set the API key in the environment variable {key_env} (clients send it as "
                        f"'Authorization: Bearer <key>'; several keys: separated by commas); it is "
                        f"{'empty' if not api_key else 'only whitespace' if not api_key.strip() else 'a list with an empty key'}",
                        where="--api-key-env")
    if not 0 < port < 65536:
        raise MiraError(f"port must be in 1..65535, got {port}", where="--port")
    from mira.models.loader import DTYPES

    if dtype not in DTYPES:
        raise MiraError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}", where="--dtype")
    torch.set_num_threads(int(os.environ.get("MIRA_THREADS", "1")))
    model, _ = load_base(model_dir, dtype=dtype, device="cpu", where="MODEL_DIR")
    app = create_app(model, api_key, limits)
    box: BlackBoxModel = app.state.box
    log(f"serving {model_dir} ({sum(p.numel() for p in model.parameters()):,} parameters, vocab {box.vocab_size}, "
        f"context {box.context_length}) on http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, workers=1)
