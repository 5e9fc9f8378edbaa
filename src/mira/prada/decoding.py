"""Generation with a remote model corrected by the device's proxy: three decoders.

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

``session`` is ``speculative`` over a server session (``SessionDecoder``): the server keeps
the KV cache, so a request carries only the tokens the server has not seen. All its rows may
come from the cache, so the same check covers every position (row 0 too, unless the server
says it is canonical), and a re-ask is a canonical session request. With a lossy encoding
(``f16``, ``q8``) the margin of each position grows by twice the row's error bound, and
re-asks are float32: the tokens stay those of float32 per-token decoding.

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
from mira.prada.errors import PradaError, ServerFailure, ServerRejected
from mira.prada.offset import ProxyPair, add_offset, combine_on_support
from mira.prada.protocol import Encoding, ScoreMatrix


@dataclass
class DraftSchedule:
    """Draft length for ``speculative`` and ``session``: start at ``initial``, stay within
    ``[minimum, maximum]``. ``rule="double"``: double after a fully accepted draft, halve when
    less than half was accepted. ``rule="rate"``: choose the length from the acceptance rate
    estimated so far (``AcceptanceRate``) with ``best_draft_length``."""

    initial: int = 4
    minimum: int = 1
    maximum: int = 16
    rule: str = "double"
    row_cost: float = 0.1  # "rate": the cost of one draft row, relative to one round trip
    decay: float = 0.7  # "rate": weight of the past per draft

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise PradaError(f"draft lengths need 1 <= min ({self.minimum}) <= initial ({self.initial}) <= "
                             f"max ({self.maximum})", where="--draft")
        if self.rule not in ("double", "rate"):
            raise PradaError(f"unknown draft rule {self.rule!r}; choose double or rate", where="--draft-rule")
        if not self.row_cost >= 0 or not 0 <= self.decay < 1:
            raise PradaError(f"need row_cost >= 0 and 0 <= decay < 1, got {self.row_cost}, {self.decay}",
                             where="--draft-rule")

    def next(self, n: int, accepted: int, proposed: int, rate: AcceptanceRate | None = None) -> int:
        if self.rule == "rate" and rate is not None:
            return best_draft_length(rate.estimate, self.minimum, self.maximum, self.row_cost)
        if accepted >= proposed:
            return min(self.maximum, n * 2)
        if accepted < n // 2:
            return max(self.minimum, n // 2)
        return n


def expected_tokens(p: float, n: int) -> float:
    """Tokens one draft of ``n`` yields when each draft token is kept with probability ``p``
    (independently): the kept run plus the device's own token at the first mismatch, at most ``n``."""
    return float(n) if p >= 1 else (1 - p ** n) / (1 - p)


def best_draft_length(p: float, minimum: int, maximum: int, row_cost: float) -> int:
    """The ``n`` in ``[minimum, maximum]`` with the most tokens per unit of cost,
    ``expected_tokens(p, n) / (1 + row_cost * n)`` (the smallest such ``n`` on ties)."""
    return max(range(minimum, maximum + 1), key=lambda n: (expected_tokens(p, n) / (1 + row_cost * n), -n))


@dataclass
class AcceptanceRate:
    """The per-token acceptance probability, from decayed counts of kept and rejected draft
    tokens (a prior of one half, worth one token)."""

    decay: float = 0.7
    kept: float = 0.0
    tried: float = 0.0

    def update(self, accepted: int, rejected: int) -> None:
        self.kept = self.decay * self.kept + accepted
        self.tried = self.decay * self.tried + accepted + rejected

    @property
    def estimate(self) -> float:
        return (self.kept + 0.5) / (self.tried + 1.0)


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
    encoding: Encoding | None = None  # scores' wire encoding (None: the client's); canonical re-asks use float32

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
    header_bytes_sent: int = 0
    header_bytes_received: int = 0
    reopened: int = 0  # session: sessions opened again after the server dropped one

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
        self.reopened = 0

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len:]

    @property
    def remaining(self) -> int:
        return self.settings.max_new_tokens - len(self.generated)

    @property
    def done(self) -> bool:
        return self.finish_reason == "eos" or self.remaining <= 0

    def choose(self, scores: ScoreMatrix, row: int, canonical: Callable[[], ScoreMatrix] | None = None,
               cached: bool = True) -> int:
        """The device's token for the next position, from the server's row ``row``. With
        ``canonical``, a decision closer to flipping than the margin is taken again from
        ``canonical()[0]``, the per-token computation, with the same random number. The margin
        is ``exact_margin`` for a ``cached`` row (not the canonical computation itself) plus
        twice the row's encoding error bound (``ScoreMatrix.error``; 0 for float32)."""
        offset = self.proxy.offset(self.ids)
        u = self.chooser.draw()
        margin = 0.0
        if canonical is not None:
            margin = (self.settings.exact_margin if cached else 0.0) + 2 * float(scores.error[row])
        token, safe = self._pick(scores, row, offset, u, margin)
        if not safe and margin > 0 and canonical is not None:
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
        witness = None
        if ids.numel() > k:  # the (k+1)-th entry is only a witness of the support's boundary
            safe_support = bool(values[k - 1] - values[k] > margin)
            witness = (values, ids)
            values, ids = values[:k], ids[:k]
        order = torch.argsort(ids)  # by token id: the same CDF order whatever the ranking's near-ties
        values, ids = values[order], ids[order]
        corrected = combine_on_support(values, ids, offset, self.settings.alpha)
        index, safe = self.chooser.pick(corrected, u, margin)
        if not safe_support and u is None and safe:
            safe_support = self._boundary_irrelevant(*witness, k, int(ids[index]), float(corrected[index]), offset,
                                                     margin)
        return int(ids[index]), safe and safe_support

    def _boundary_irrelevant(self, values: torch.Tensor, ids: torch.Tensor, k: int, chosen: int, best: float,
                             offset: torch.Tensor, margin: float) -> bool:
        """Greedy, with the support's boundary within the margin: the canonical support may hold
        other tokens than the k received, but the argmax is the same if (1) the chosen token is
        more than the margin above the (k+1)-th log-probability, so it stays in the canonical
        top k; (2) the received (k+1)-th token and (3) every token not received, whose
        log-probability is at most the (k+1)-th one, stay more than the margin below ``best``
        after their offsets (the device has the whole offset vector)."""
        shift = self.settings.alpha * offset.float()
        rank = int((ids == chosen).nonzero()[0, 0])
        if not values[rank] - values[k] > margin:  # (1)
            return False
        if not float(values[k] + shift[ids[k]]) < best - margin:  # (2)
            return False
        outside = shift.clone()
        outside[ids] = -math.inf
        return bool(float(values[k] + outside.max()) < best - margin)  # (3)

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

    def ask_k(self, top_k: int | None) -> int | None:
        """The log-probs to ask for with top-k: one entry more than the support (when the vocabulary
        has one more), to see how close the support's boundary is; None for full rows."""
        return None if top_k is None else (top_k + 1 if top_k < self.proxy.vocab_size else top_k)

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
            acceptance_rate=(run.accepted / run.drafted) if run.drafted else None, fallbacks=run.fallbacks,
            header_bytes_sent=traffic.header_bytes_sent, header_bytes_received=traffic.header_bytes_received,
            reopened=run.reopened)


@register_decoder
class PerTokenDecoder(Decoder):
    """One server call per token."""

    name = "per-token"

    def decode(self, run: Run) -> None:
        while not run.done:
            scores = self.client.logits([run.ids], top_k=run.settings.top_k, encoding=run.settings.encoding)
            run.emit(run.choose(scores, 0))


@register_decoder
class SpeculativeDecoder(Decoder):
    """The server drafts ``n`` tokens per call; the device keeps them while they match its choice."""

    name = "speculative"

    def decode(self, run: Run) -> None:
        schedule = run.settings.draft
        n = schedule.initial
        top_k = run.settings.top_k
        ask_k = self.ask_k(top_k)

        encoding = run.settings.encoding

        def canonical() -> ScoreMatrix:  # the per-token computation of this position, in float32
            return self.client.logits([run.ids], top_k=ask_k, encoding="base64")

        rate = AcceptanceRate(schedule.decay)
        while not run.done:
            draft = self.client.draft(run.ids, min(n, run.remaining), top_k=ask_k, encoding=encoding)
            # row 0 comes from the server's full forward of the prefix: canonical already
            n = walk_draft(run, draft, canonical, schedule, n, rate)


def walk_draft(run: Run, draft, canonical: Callable[[], ScoreMatrix], schedule: DraftSchedule, n: int,
               rate: AcceptanceRate) -> int:
    """Choose a token at each draft position while the choice equals the draft token; the next ``n``."""
    accepted = rejected = 0
    for i, proposed in enumerate(draft.tokens):
        token = run.choose(draft.scores, i, canonical, cached=not (i == 0 and draft.first_canonical))
        run.emit(token)
        if token != proposed:
            rejected = 1
            break
        accepted += 1
        if run.done:
            break
    run.drafted += len(draft.tokens)
    run.accepted += accepted
    rate.update(accepted, rejected)
    return schedule.next(n, accepted, len(draft.tokens), rate)


@register_decoder
class SessionDecoder(Decoder):
    """``speculative`` over a server session: the server keeps the KV cache, so each request
    carries only the tokens it has not seen (the kept draft tokens and the device's own).
    Every row of a session draft after the first comes from the cache, and so may row 0
    (``Draft.first_canonical`` says): the near-tie check covers them all, and a re-ask is a
    canonical session request (one full forward on the server, float32). When the server
    has dropped the session (time to live, eviction), a new one is opened with the whole
    sequence (``GenerationMetrics.reopened``). The session is closed at the end."""

    name = "session"

    def decode(self, run: Run) -> None:
        schedule = run.settings.draft
        n = schedule.initial
        top_k = run.settings.top_k
        ask_k = self.ask_k(top_k)
        encoding = run.settings.encoding
        rate = AcceptanceRate(schedule.decay)
        state = {"sid": None, "sent": 0}  # the session, and how many of run.ids it has committed

        def canonical() -> ScoreMatrix:
            if state["sid"] is not None:
                try:
                    scores = self.client.session_logits(state["sid"], run.ids[state["sent"]:], canonical=True,
                                                        top_k=ask_k, encoding="base64")
                    state["sent"] = len(run.ids)
                    return scores
                except ServerRejected as e:
                    if e.code != "unknown_session":
                        raise
                    state["sid"] = None
            return self.client.logits([run.ids], top_k=ask_k, encoding="base64")  # stateless, same row

        while not run.done:
            want = min(n, run.remaining)
            if state["sid"] is None:
                if run.drafted:
                    run.reopened += 1
                state["sid"], draft = self.client.open_session(run.ids, want, top_k=ask_k, encoding=encoding)
            else:
                try:
                    draft = self.client.session_draft(state["sid"], run.ids[state["sent"]:], want, top_k=ask_k,
                                                      encoding=encoding)
                except ServerRejected as e:
                    if e.code != "unknown_session":
                        raise
                    state["sid"] = None
                    continue
            state["sent"] = len(run.ids)
            n = walk_draft(run, draft, canonical, schedule, n, rate)
        if state["sid"] is not None:
            self.client.close_session(state["sid"])


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
