"""Generation with a remote model corrected by the device's proxy: two decoders.

* ``per-token``: one ``/v1/logits`` call per generated token; the device adds the offset
  and chooses the token.
* ``speculative``: one ``/v1/draft`` call returns ``n`` greedy tokens of the remote model and
  its scores at each of the ``n`` positions. The device walks the positions, adds the offset
  and chooses a token at each; it keeps going while its choice equals the draft token, and at
  the first mismatch keeps its own token and asks for the next draft from there. ``n`` adapts:
  it doubles after a fully accepted draft and halves when less than half was accepted
  (``DraftSchedule`` bounds it).

Both decoders choose exactly one token per generated position, from the same scores, with
the same ``TokenChooser``: greedy, or sampling by inverse CDF from one seeded uniform number
per position. The server computes draft rows with a KV cache and per-token rows with one
full forward of the prefix (the *canonical* computation); in float32 the two differ by up to
a few 1e-5 (``benchmarks/prada_exactness.py``). So the speculative decoder checks every
draft position after the first (the first row of a draft *is* the canonical forward): when
the decision is closer than ``DecodeSettings.exact_margin`` to flipping (greedy: the two best
corrected scores are within the margin; sampling: the uniform number lies within the
corresponding probability distance of a CDF boundary; top-k: also the gap between the k-th
and the (k+1)-th log-probability, which the speculative decoder asks for), it re-asks that
position with ``/v1/logits`` and decides from the canonical row with the same uniform
number. If the two paths differ by less than ``exact_margin / 2`` per score, the speculative
tokens are then exactly the per-token tokens. ``GenerationMetrics.fallbacks`` counts the
re-asked positions.

Any ``PradaError`` raised during a generation (timeout, dead server, context full, rejected
request) is re-raised carrying the text and token ids generated so far and the metrics.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from mira.prada.client import BlackBoxClient, Traffic
from mira.prada.errors import PradaError, ServerFailure
from mira.prada.offset import ProxyPair, add_offset, combine_on_support
from mira.prada.protocol import ScoreMatrix


@dataclass
class DraftSchedule:
    """Draft length for ``speculative``: start at ``initial``, stay within ``[minimum, maximum]``."""

    initial: int = 4
    minimum: int = 1
    maximum: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise PradaError(f"draft lengths need 1 <= min ({self.minimum}) <= initial ({self.initial}) <= "
                             f"max ({self.maximum})", where="--draft")

    def next(self, n: int, accepted: int, proposed: int) -> int:
        if accepted >= proposed:
            return min(self.maximum, n * 2)
        if accepted < n // 2:
            return max(self.minimum, n // 2)
        return n


DEFAULT_EXACT_MARGIN = 1e-3  # > 2 x 5.6e-5, the largest cached-vs-full gap measured (docs/prada.md)


@dataclass
class DecodeSettings:
    max_new_tokens: int = 64
    alpha: float = 1.0
    top_k: int | None = None  # ask the server for top-k log-probs only
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    draft: DraftSchedule = field(default_factory=DraftSchedule)
    exact_margin: float = DEFAULT_EXACT_MARGIN  # speculative: re-ask positions decided closer than this

    def __post_init__(self) -> None:
        if not (self.exact_margin >= 0 and math.isfinite(self.exact_margin)):
            raise PradaError(f"exact_margin must be a finite number >= 0, got {self.exact_margin}",
                             where="--exact-margin")
        if self.max_new_tokens < 1:
            raise PradaError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}", where="--max-new-tokens")
        if self.temperature < 0:
            raise PradaError(f"temperature must be >= 0, got {self.temperature}", where="--temperature")
        if self.top_k is not None and self.top_k < 1:
            raise PradaError(f"top_k must be at least 1, got {self.top_k}", where="--top-k")


@dataclass
class GenerationMetrics:
    mode: str
    new_tokens: int
    round_trips: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    server_seconds: float
    tokens_per_second: float
    drafted: int = 0  # draft tokens received (speculative)
    accepted: int = 0  # draft tokens kept
    acceptance_rate: float | None = None
    fallbacks: int = 0  # speculative positions decided from a canonical /v1/logits row (near-ties)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" or "length"
    metrics: GenerationMetrics

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "finish_reason": self.finish_reason, "metrics": self.metrics.to_dict()}


class TokenChooser:
    """Greedy argmax, or inverse-CDF sampling from ``softmax(scores / temperature)`` with one
    seeded uniform number per position (``draw``), so that a position can be decided twice
    (from a draft row, then from the canonical row) with the same random number."""

    def __init__(self, temperature: float, seed: int):
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self) -> float | None:
        """The position's random number (None when greedy)."""
        if self.temperature == 0:
            return None
        return float(torch.rand((), dtype=torch.float64, generator=self.generator))

    def pick(self, scores: torch.Tensor, u: float | None, margin: float = 0.0) -> tuple[int, bool]:
        """``(index, safe)``: the choice, and whether it holds for every score vector within
        ``margin / 2`` of ``scores`` in each entry (the same ``u``)."""
        scores = scores.double()
        if u is None:
            best = int(scores.argmax())
            if scores.numel() < 2:
                return best, True
            rest = scores.clone()
            rest[best] = -math.inf
            return best, bool(scores[best] - rest.max() > margin)
        cdf = torch.cumsum(torch.softmax(scores / self.temperature, dim=-1), 0)
        total = float(cdf[-1])
        x = u * total
        index = min(int(torch.searchsorted(cdf, torch.tensor([x], dtype=torch.float64), right=True)),
                    scores.numel() - 1)
        # each score moves by < margin/2, so each CDF value by < expm1(margin / T) (relative to the total)
        slack = math.expm1(margin / self.temperature) + 1e-12
        lower = float(cdf[index - 1]) / total if index > 0 else -math.inf
        upper = float(cdf[index]) / total if index < scores.numel() - 1 else math.inf
        return index, bool(u - lower > slack and upper - u > slack)

    def __call__(self, scores: torch.Tensor) -> int:
        return self.pick(scores, self.draw())[0]


OnToken = Callable[[int, "Run"], None]


class Run:
    """The state of one generation: the sequence, the proxy, the chooser, the counters."""

    def __init__(self, prompt_ids: list[int], proxy: ProxyPair, settings: DecodeSettings, eos_ids: set[int],
                 on_token: OnToken | None):
        self.ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.proxy = proxy
        self.settings = settings
        self.eos_ids = eos_ids
        self.on_token = on_token
        self.chooser = TokenChooser(settings.temperature, settings.seed)
        self.finish_reason = "length"
        self.drafted = 0
        self.accepted = 0
        self.fallbacks = 0

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len:]

    @property
    def remaining(self) -> int:
        return self.settings.max_new_tokens - len(self.generated)

    @property
    def done(self) -> bool:
        return self.finish_reason == "eos" or self.remaining <= 0

    def choose(self, scores: ScoreMatrix, row: int, canonical: Callable[[], ScoreMatrix] | None = None) -> int:
        """The device's token for the next position, from the server's row ``row``. With
        ``canonical`` (a speculative draft row), a decision within ``exact_margin`` of flipping
        is taken again from ``canonical()[0]``, the per-token computation, with the same random number."""
        offset = self.proxy.offset(self.ids)
        u = self.chooser.draw()
        margin = self.settings.exact_margin if canonical is not None else 0.0
        token, safe = self._pick(scores, row, offset, u, margin)
        if not safe and canonical is not None:
            self.fallbacks += 1
            token, _ = self._pick(canonical(), 0, offset, u, 0.0)
        return token

    def _pick(self, scores: ScoreMatrix, row: int, offset: torch.Tensor, u: float | None,
              margin: float) -> tuple[int, bool]:
        values = scores.values[row]
        if scores.ids is None:
            if values.numel() != offset.numel():
                raise ServerFailure(f"the server sent {values.numel()} logits; the proxy's vocabulary has "
                                    f"{offset.numel()}", where="server")
            return self.chooser.pick(add_offset(values, offset, self.settings.alpha), u, margin)
        ids = scores.ids[row]
        if int(ids.max()) >= offset.numel() or int(ids.min()) < 0:
            raise ServerFailure(f"the server sent token id {int(ids.max())}, outside the proxy's vocabulary",
                                where="server")
        k = self.settings.top_k or ids.numel()
        safe_support = True
        if ids.numel() > k:  # the (k+1)-th entry is only a witness of the support's boundary
            safe_support = bool(values[k - 1] - values[k] > margin)
            values, ids = values[:k], ids[:k]
        order = torch.argsort(ids)  # by token id: the same CDF order whatever the ranking's near-ties
        values, ids = values[order], ids[order]
        index, safe = self.chooser.pick(combine_on_support(values, ids, offset, self.settings.alpha), u, margin)
        return int(ids[index]), safe and safe_support

    def emit(self, token: int) -> None:
        self.ids.append(token)
        if token in self.eos_ids:
            self.finish_reason = "eos"
        if self.on_token is not None:
            self.on_token(token, self)


DECODERS: dict[str, type[Decoder]] = {}


def register_decoder(cls: type[Decoder]) -> type[Decoder]:
    DECODERS[cls.name] = cls
    return cls


class Decoder(ABC):
    """Generates with ``client`` (the remote model) corrected by ``proxy``."""

    name: ClassVar[str]

    def __init__(self, client: BlackBoxClient, proxy: ProxyPair, tokenizer, eos_ids: set[int] | None = None):
        self.client = client
        self.proxy = proxy
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos_ids = eos_ids

    def generate(self, prompt_ids: list[int], settings: DecodeSettings, on_token: OnToken | None = None) -> Generation:
        if not prompt_ids:
            raise PradaError("the prompt is empty", where="--prompt")
        run = Run(prompt_ids, self.proxy, settings, self.eos_ids, on_token)
        before = self.client.traffic.copy()
        t0 = time.perf_counter()
        try:
            self.decode(run)
        except PradaError as e:
            metrics = self._metrics(run, self.client.traffic.minus(before), time.perf_counter() - t0)
            raise e.with_progress(self._text(run), run.generated, metrics) from e
        metrics = self._metrics(run, self.client.traffic.minus(before), time.perf_counter() - t0)
        return Generation(text=self._text(run), token_ids=run.generated, prompt_tokens=run.prompt_len,
                          finish_reason=run.finish_reason, metrics=metrics)

    @abstractmethod
    def decode(self, run: Run) -> None:
        """Generate into ``run`` until ``run.done``."""

    def _text(self, run: Run) -> str:
        return self.tokenizer.decode(run.generated, skip_special_tokens=True)

    def _metrics(self, run: Run, traffic: Traffic, seconds: float) -> GenerationMetrics:
        n = len(run.generated)
        return GenerationMetrics(
            mode=self.name, new_tokens=n, round_trips=traffic.round_trips, bytes_sent=traffic.bytes_sent,
            bytes_received=traffic.bytes_received, seconds=seconds, server_seconds=traffic.seconds,
            tokens_per_second=n / seconds if seconds > 0 else 0.0, drafted=run.drafted, accepted=run.accepted,
            acceptance_rate=(run.accepted / run.drafted) if run.drafted else None, fallbacks=run.fallbacks)


@register_decoder
class PerTokenDecoder(Decoder):
    """One server call per token."""

    name = "per-token"

    def decode(self, run: Run) -> None:
        while not run.done:
            scores = self.client.logits([run.ids], top_k=run.settings.top_k)
            run.emit(run.choose(scores, 0))


@register_decoder
class SpeculativeDecoder(Decoder):
    """The server drafts ``n`` tokens per call; the device keeps them while they match its choice."""

    name = "speculative"

    def decode(self, run: Run) -> None:
        schedule = run.settings.draft
        n = schedule.initial
        top_k = run.settings.top_k
        # top-k: one entry more than the support, to see how close the support's boundary is
        ask_k = None if top_k is None else (top_k + 1 if top_k < self.proxy.vocab_size else top_k)

        def canonical() -> ScoreMatrix:  # the per-token computation of this position
            return self.client.logits([run.ids], top_k=ask_k)

        while not run.done:
            draft = self.client.draft(run.ids, min(n, run.remaining), top_k=ask_k)
            accepted = 0
            for i, proposed in enumerate(draft.tokens):
                # row 0 comes from the server's full forward of the prefix: canonical already
                token = run.choose(draft.scores, i, canonical if i > 0 and run.settings.exact_margin > 0 else None)
                run.emit(token)
                if token != proposed:
                    break
                accepted += 1
                if run.done:
                    break
            run.drafted += len(draft.tokens)
            run.accepted += accepted
            n = schedule.next(n, accepted, len(draft.tokens))


def make_decoder(mode: str, client: BlackBoxClient, proxy: ProxyPair, tokenizer,
                 eos_ids: set[int] | None = None) -> Decoder:
    if mode not in DECODERS:
        raise PradaError(f"unknown mode {mode!r}; choose one of {sorted(DECODERS)}", where="--mode")
    return DECODERS[mode](client, proxy, tokenizer, eos_ids)


TEMPLATES = ("alpaca", "raw")


def prompt_ids(tokenizer, prompt: str, input_text: str = "", template: str = "alpaca") -> list[int]:
    """Token ids of a prompt: the Alpaca template exactly as ``tokenize_records`` builds it
    (what the adapter was trained on), or ``raw``: BOS and the text as it is."""
    from mira.data.prompts import Tokenizer
    from mira.data.records import Record

    if template == "alpaca":
        return Tokenizer(tokenizer, 1 << 30, "alpaca").prompt_ids(Record(instruction=prompt, input=input_text, output=" "))
    if template == "raw":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(prompt + input_text, add_special_tokens=False)["input_ids"]
    raise PradaError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}", where="--template")
