"""The wire format between the device and the black-box server: JSON over HTTP.

Token ids go in (the device and the server share one tokenizer); score matrices come
out. A ``Scores`` object is a ``rows x cols`` float32 matrix, either

* ``kind="logits"``: full-vocabulary logits (``cols == vocab_size``, ``ids`` is null), or
* ``kind="logprobs"``: the top-k log-probabilities of each row (``cols == k``) with their
  token ids in ``ids`` (sorted by decreasing probability).

``encoding="base64"`` (the default) packs the values as little-endian float32 bytes,
row-major, base64-encoded: exact and about 5x smaller than ``encoding="list"`` (plain JSON
numbers, for reading with curl). Both encodings round-trip float32 values exactly.
Two compact encodings are lossy, with a known bound on the error of every value:

* ``"f16"``: little-endian float16, base64 (half the bytes of float32). A value ``v`` comes
  back within ``|v| * 2**-11`` (round to nearest; the bound used is ``max|row| * 2**-10``).
* ``"q8"``: per row a float32 ``lo`` and ``scale``, then one uint8 ``q`` per value,
  ``v ~ lo + q * scale`` with ``scale = (max - min) / 255``: a quarter of the bytes of
  float32, each value within ``scale / 2``.

With either, top-k ``ids`` are packed too: base64 little-endian uint16 (``id_dtype="u2"``,
vocabularies up to 65,536) or int32 (``"i4"``), instead of JSON lists. ``decode_scores``
returns the per-row error bound with the values (``ScoreMatrix.error``), so that a decoder
can treat a decision closer than the bound as undecided (``mira.prada.decoding``).

Endpoints (see ``mira.prada.server``):

* ``GET  /health``     -> ``Health`` (no key needed; no weights, only public limits);
* ``POST /v1/logits``  ``LogitsRequest``  -> ``LogitsResponse``: next-token scores of each prefix;
* ``POST /v1/draft``   ``DraftRequest``   -> ``DraftResponse``: ``n`` greedy tokens from one
  prefix and the scores at each of their positions (row ``i`` is the distribution that
  token ``i`` was drawn from).

Sessions (the server keeps the KV cache between requests; see ``mira.prada.sessions``):

* ``POST /v1/sessions`` ``SessionOpen`` -> ``SessionOpened``: prefill ``prefix``; with ``n``,
  also the first draft (as ``/v1/draft``), in the same round trip;
* ``POST /v1/sessions/{id}/draft`` ``SessionDraftRequest`` -> ``SessionDraft``: append
  ``tokens`` (only the tokens the server has not been sent yet) and draft ``n``;
* ``POST /v1/sessions/{id}/logits`` ``SessionLogitsRequest`` -> ``SessionLogits``: append
  ``tokens`` and return the next-token scores; ``canonical: true`` computes them with one
  full forward of the whole sequence, bit-identical to ``/v1/logits``;
* ``DELETE /v1/sessions/{id}`` -> 204.

An unknown, expired, evicted, closed or other key's session is 404 ``unknown_session``.

Errors are ``{"detail": {"code": ..., "message": ...}}`` with status 401, 404, 411, 413, 422 or 429.
"""
from __future__ import annotations

import base64
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, StrictInt

Encoding = Literal["base64", "list", "f16", "q8"]
LOSSY: tuple[str, ...] = ("f16", "q8")
F16_BOUND = 2.0 ** -10  # relative, per row: twice float16's half-ulp, for safety
API_KEY_HEADER = "Authorization"  # "Bearer <key>"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogitsRequest(_Strict):
    prefixes: list[list[StrictInt]]
    top_k: StrictInt | None = None
    encoding: Encoding = "base64"


class DraftRequest(_Strict):
    prefix: list[StrictInt]
    n: StrictInt
    top_k: StrictInt | None = None
    encoding: Encoding = "base64"


class Scores(_Strict):
    kind: Literal["logits", "logprobs"]
    rows: int
    cols: int
    encoding: Encoding
    values: str | list[list[float]]
    ids: list[list[int]] | str | None = None
    id_dtype: Literal["u2", "i4"] | None = None  # packed ids (f16, q8)


class LogitsResponse(_Strict):
    scores: Scores


class DraftResponse(_Strict):
    tokens: list[int]
    stop: Literal["length", "eos", "context"]
    scores: Scores


class Health(_Strict):
    status: Literal["ok"]
    model_type: str
    vocab_size: int
    context_length: int
    eos_token_ids: list[int]
    max_batch: int
    max_draft: int
    sessions: bool = False
    session_ttl: float | None = None
    max_sessions_per_key: int | None = None


class SessionOpen(_Strict):
    prefix: list[StrictInt]
    n: StrictInt | None = None  # also draft n tokens
    top_k: StrictInt | None = None
    encoding: Encoding = "base64"


class SessionDraftRequest(_Strict):
    tokens: list[StrictInt]  # appended to the sequence the server holds
    n: StrictInt
    top_k: StrictInt | None = None
    encoding: Encoding = "base64"


class SessionLogitsRequest(_Strict):
    tokens: list[StrictInt]
    canonical: bool = False
    top_k: StrictInt | None = None
    encoding: Encoding = "base64"


class SessionDraft(_Strict):
    length: int  # tokens committed in the session (the prefix and every token sent)
    tokens: list[int]
    stop: Literal["length", "eos", "context"]
    first_canonical: bool  # row 0 is the canonical computation (one full forward of the sequence)
    scores: Scores


class SessionOpened(_Strict):
    session_id: str
    length: int
    expires_in: float  # idle seconds before the server drops the session
    draft: SessionDraft | None = None


class SessionLogits(_Strict):
    length: int
    canonical: bool
    scores: Scores


class ErrorDetail(_Strict):
    code: str
    message: str


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def quantize_q8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, scale, q)`` per row of a float32 ``[rows, cols]`` matrix (``q`` uint8)."""
    lo = values.min(axis=1, initial=np.inf).astype(np.float32) if values.shape[1] else np.zeros(values.shape[0], np.float32)
    hi = values.max(axis=1, initial=-np.inf).astype(np.float32) if values.shape[1] else lo
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale[~(scale > 0)] = np.float32(1.0)
    q = np.clip(np.rint((values - lo[:, None]) / scale[:, None]), 0, 255).astype(np.uint8)
    return lo, scale, q


def encode_scores(values: torch.Tensor, ids: torch.Tensor | None, encoding: Encoding) -> Scores:
    """Pack a ``[rows, cols]`` matrix (and the top-k ``ids``, same shape) for the wire."""
    values = values.detach().to(torch.float32).cpu().contiguous()
    rows, cols = values.shape
    kind = "logits" if ids is None else "logprobs"
    packed: str | list[list[float]]
    v = values.numpy()
    if encoding == "base64":
        packed = _b64(v.astype("<f4"))
    elif encoding == "list":
        packed = values.tolist()
    elif encoding == "f16":
        if not np.isfinite(v).all() or (np.abs(v) > 65000).any():
            raise ValueError("f16 needs finite values below 65,000 in magnitude")
        packed = _b64(v.astype("<f2"))
    elif encoding == "q8":
        if not np.isfinite(v).all():
            raise ValueError("q8 needs finite values")
        lo, scale, q = quantize_q8(v)
        header = np.stack([lo, scale], axis=1).astype("<f4")  # [rows, 2]
        packed = _b64(header) + "." + _b64(q)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    if ids is None or encoding in ("base64", "list"):
        return Scores(kind=kind, rows=rows, cols=cols, encoding=encoding, values=packed,
                      ids=None if ids is None else ids.tolist())
    i = ids.detach().cpu().numpy()
    id_dtype = "u2" if (i.size == 0 or (i.min() >= 0 and i.max() < 65536)) else "i4"
    return Scores(kind=kind, rows=rows, cols=cols, encoding=encoding, values=packed,
                  ids=_b64(i.astype("<u2" if id_dtype == "u2" else "<i4")), id_dtype=id_dtype)


class ScoreMatrix:
    """A decoded ``Scores``: ``values`` float32 ``[rows, cols]``, ``ids`` (long) or None, and
    ``error``: float64 ``[rows]``, a bound on ``|decoded - sent|`` per value (0 when exact)."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor | None, error: torch.Tensor | None = None):
        self.values = values
        self.ids = ids
        self.error = torch.zeros(values.shape[0], dtype=torch.float64) if error is None else error

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def top_k(self) -> bool:
        return self.ids is not None


def _unb64(text, dtype: str, count: int, what: str) -> np.ndarray:
    raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    size = np.dtype(dtype).itemsize
    if len(raw) != count * size:
        raise ValueError(f"expected {count} {what} ({count * size} bytes), got {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype)


def decode_scores(scores: Scores) -> ScoreMatrix:
    """Unpack ``Scores``; raises ``ValueError`` when the shape does not match the data."""
    rows, cols = scores.rows, scores.cols
    if rows < 0 or cols < 0:
        raise ValueError(f"bad shape {rows}x{cols}")
    error = None
    if scores.encoding == "f16":
        v = _unb64(scores.values, "<f2", rows * cols, "float16 values").astype(np.float32).reshape(rows, cols)
        values = torch.from_numpy(v)
        error = (values.abs().amax(dim=1).double() * F16_BOUND if cols else torch.zeros(rows, dtype=torch.float64))
    elif scores.encoding == "q8":
        if not isinstance(scores.values, str) or scores.values.count(".") != 1:
            raise ValueError("q8 values must be '<header>.<codes>'")
        head, codes = scores.values.split(".")
        header = _unb64(head, "<f4", rows * 2, "q8 row headers").astype(np.float64).reshape(rows, 2)
        q = _unb64(codes, "u1", rows * cols, "q8 codes").astype(np.float64).reshape(rows, cols)
        values = torch.from_numpy((header[:, :1] + q * header[:, 1:]).astype(np.float32))
        # half a step, plus float32 rounding of lo + q * scale
        span = np.abs(header[:, 0]) + 255 * np.abs(header[:, 1])
        error = torch.from_numpy(header[:, 1] / 2 + span * 2.0 ** -22)
    if scores.encoding in LOSSY:
        ids = None
        if scores.kind == "logprobs":
            if not isinstance(scores.ids, str) or scores.id_dtype is None:
                raise ValueError("packed top-k scores without their packed token ids")
            dtype = "<u2" if scores.id_dtype == "u2" else "<i4"
            ids = torch.from_numpy(_unb64(scores.ids, dtype, rows * cols, "token ids").astype(np.int64)
                                   .reshape(rows, cols))
        return ScoreMatrix(values, ids, error)
    if scores.encoding == "base64":
        raw = base64.b64decode(scores.values, validate=True) if isinstance(scores.values, str) else b""
        if len(raw) != scores.rows * scores.cols * 4:
            raise ValueError(f"expected {scores.rows}x{scores.cols} float32 values, got {len(raw)} bytes")
        values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(scores.rows, scores.cols))
    else:
        if not isinstance(scores.values, list):
            raise ValueError("encoding 'list' needs a list of rows")
        values = torch.tensor(scores.values, dtype=torch.float32).reshape(-1, scores.cols) if scores.values else \
            torch.zeros(0, scores.cols)
        if values.shape[0] != scores.rows:
            raise ValueError(f"expected {scores.rows} rows, got {values.shape[0]}")
    ids = None
    if scores.kind == "logprobs":
        if scores.ids is None:
            raise ValueError("top-k log-probabilities without their token ids")
        if isinstance(scores.ids, str):
            raise ValueError(f"encoding {scores.encoding!r} sends ids as JSON lists")
        ids = torch.tensor(scores.ids, dtype=torch.long).reshape(-1, scores.cols) if scores.ids else \
            torch.zeros(0, scores.cols, dtype=torch.long)
        if ids.shape != values.shape:
            raise ValueError(f"ids of shape {tuple(ids.shape)} for values of shape {tuple(values.shape)}")
    return ScoreMatrix(values, ids)
