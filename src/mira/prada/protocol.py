"""The wire format between the device and the black-box server: JSON over HTTP.

Token ids go in (the device and the server share one tokenizer); score matrices come
out. A ``Scores`` object is a ``rows x cols`` float32 matrix, either

* ``kind="logits"``: full-vocabulary logits (``cols == vocab_size``, ``ids`` is null), or
* ``kind="logprobs"``: the top-k log-probabilities of each row (``cols == k``) with their
  token ids in ``ids`` (sorted by decreasing probability).

``encoding="base64"`` (the default) packs the values as little-endian float32 bytes,
row-major, base64-encoded: exact and about 5x smaller than ``encoding="list"`` (plain JSON
numbers, for reading with curl). Both encodings round-trip float32 values exactly.

Endpoints (see ``mira.prada.server``):

* ``GET  /health``     -> ``Health`` (no key needed; no weights, only public limits);
* ``POST /v1/logits``  ``LogitsRequest``  -> ``LogitsResponse``: next-token scores of each prefix;
* ``POST /v1/draft``   ``DraftRequest``   -> ``DraftResponse``: ``n`` greedy tokens from one
  prefix and the scores at each of their positions (row ``i`` is the distribution that
  token ``i`` was drawn from).

Errors are ``{"detail": {"code": ..., "message": ...}}`` with status 401, 411, 413 or 422.
"""
from __future__ import annotations

import base64
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, StrictInt

Encoding = Literal["base64", "list"]
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
    ids: list[list[int]] | None = None


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


class ErrorDetail(_Strict):
    code: str
    message: str


def encode_scores(values: torch.Tensor, ids: torch.Tensor | None, encoding: Encoding) -> Scores:
    """Pack a ``[rows, cols]`` matrix (and the top-k ``ids``, same shape) for the wire."""
    values = values.detach().to(torch.float32).cpu().contiguous()
    rows, cols = values.shape
    kind = "logits" if ids is None else "logprobs"
    packed: str | list[list[float]]
    if encoding == "base64":
        packed = base64.b64encode(values.numpy().astype("<f4").tobytes()).decode("ascii")
    else:
        packed = values.tolist()
    return Scores(kind=kind, rows=rows, cols=cols, encoding=encoding, values=packed,
                  ids=None if ids is None else ids.tolist())


class ScoreMatrix:
    """A decoded ``Scores``: ``values`` float32 ``[rows, cols]`` and ``ids`` (long) or None."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor | None):
        self.values = values
        self.ids = ids

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def top_k(self) -> bool:
        return self.ids is not None


def decode_scores(scores: Scores) -> ScoreMatrix:
    """Unpack ``Scores``; raises ``ValueError`` when the shape does not match the data."""
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
        ids = torch.tensor(scores.ids, dtype=torch.long).reshape(-1, scores.cols) if scores.ids else \
            torch.zeros(0, scores.cols, dtype=torch.long)
        if ids.shape != values.shape:
            raise ValueError(f"ids of shape {tuple(ids.shape)} for values of shape {tuple(values.shape)}")
    return ScoreMatrix(values, ids)
