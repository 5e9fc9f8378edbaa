"""Speculative == per-token, exactly, even at near-ties of the corrected scores.

Draft rows come from the server's KV cache, per-token rows from a full forward (the canonical
computation); they differ in the last float32 bits. The speculative decoder re-asks every
draft position whose decision is within ``exact_margin`` of flipping. The property test
bisects ``alpha`` until the two best corrected scores at some position tie (to ~1e-7), then
asserts that both decoders give the same tokens on every such prompt.
"""
from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from mira.prada.client import BlackBoxClient
from mira.prada.decoding import DecodeSettings, DraftSchedule, TokenChooser, make_decoder, prompt_ids
from mira.prada.errors import PradaError
from mira.prada.offset import add_offset
from mira.prada.protocol import DraftResponse, LogitsResponse, encode_scores

from .conftest import API_KEY, CONTEXT

NEW = 16


# -- units -----------------------------------------------------------------------------------------
def test_the_chooser_reports_decisions_too_close_to_flip():
    greedy = TokenChooser(0.0, seed=0)
    assert greedy.pick(torch.tensor([1.0, 1.0005, -3.0]), None, 1e-3) == (1, False)
    assert greedy.pick(torch.tensor([1.0, 1.01, -3.0]), None, 1e-3) == (1, True)
    sampler = TokenChooser(1.0, seed=0)
    even = torch.tensor([0.0, 0.0])  # CDF boundary at 0.5
    assert sampler.pick(even, 0.5 + 1e-6, 1e-3) == (1, False)
    assert sampler.pick(even, 0.9, 1e-3) == (1, True)
    assert sampler.pick(even, 0.1, 1e-3) == (0, True)
    with pytest.raises(PradaError, match="exact_margin"):
        DecodeSettings(exact_margin=-1.0)


def scripted(vocab: int, draft_gap: float, calls: list[str]):
    """A fake server: drafts token 7 ahead of token 8 by ``draft_gap``; the canonical row prefers 8."""
    draft_row = torch.full((vocab,), -5.0)
    draft_row[7], draft_row[8] = 10.0 + draft_gap, 10.0
    canonical = torch.full((1, vocab), -5.0)
    canonical[0, 7], canonical[0, 8] = 10.0, 11.0

    def handler(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        calls.append(request.url.path)
        if request.url.path == "/v1/logits":
            body = LogitsResponse(scores=encode_scores(canonical, None, "base64"))
        else:
            n = payload["n"]
            body = DraftResponse(tokens=[7] * n, stop="length",
                                 scores=encode_scores(draft_row.repeat(n, 1), None, "base64"))
        return httpx.Response(200, content=body.model_dump_json().encode(),
                              headers={"content-type": "application/json"})

    return handler


@pytest.mark.parametrize("gap, margin, tokens, fallbacks", [
    (1e-6, 1e-3, [7, 8], 1),  # row 1 is a near-tie: decided from the canonical row (which prefers 8)
    (1e-2, 1e-3, [7, 7], 0),  # a clear decision: the draft row is used
    (1e-6, 0.0, [7, 7], 0),  # exact_margin 0 turns the check off
])
def test_a_draft_position_below_the_margin_is_resolved_canonically(pair, tokenizer, gap, margin, tokens, fallbacks):
    calls: list[str] = []
    with BlackBoxClient("http://fake", API_KEY, transport=httpx.MockTransport(scripted(pair.vocab_size, gap, calls))) \
            as client:
        gen = make_decoder("speculative", client, pair, tokenizer, eos_ids=set()).generate(
            [1, 5, 6], DecodeSettings(max_new_tokens=2, alpha=0.0, exact_margin=margin,
                                      draft=DraftSchedule(initial=4, minimum=1, maximum=4)))
    assert gen.token_ids == tokens  # row 0 is the canonical forward itself: never re-asked
    assert gen.metrics.fallbacks == fallbacks
    assert calls == ["/v1/draft"] + ["/v1/logits"] * fallbacks
    assert gen.metrics.round_trips == len(calls)


def test_draft_row_zero_is_bit_identical_to_the_logits_of_the_prefix(client):
    prefix = [1, 17, 42, 9, 33]
    assert torch.equal(client.draft(prefix, 3).scores.values[0], client.logits([prefix]).values[0])


# -- the property: near-ties on purpose --------------------------------------------------------------
@pytest.fixture(scope="module")
def target(zoo):
    return AutoModelForCausalLM.from_pretrained(zoo.target).eval()


@torch.no_grad()
def canonical_scores(target, pair, seq: list[int], alpha: float) -> torch.Tensor:
    return add_offset(target(torch.tensor([seq])).logits[0, -1].float(), pair.offset(seq), alpha)


def greedy(target, pair, prompt: list[int], alpha: float, stop_at: list[int] | None = None) -> list[int]:
    """The per-token greedy tokens, computed here; stops early once it leaves ``stop_at``."""
    seq = list(prompt)
    for i in range(NEW):
        seq.append(int(canonical_scores(target, pair, seq, alpha).argmax()))
        if stop_at is not None and seq[-1] != stop_at[i]:
            break
    return seq[len(prompt):]


def tie_alpha(target, pair, prompt: list[int]) -> tuple[float, int] | None:
    """An alpha at which the two best corrected scores tie at some position (and that position)."""
    lo, hi = 0.0, 3.0
    a, b = greedy(target, pair, prompt, lo), greedy(target, pair, prompt, hi)
    if a == b:
        return None
    for _ in range(10):
        mid = (lo + hi) / 2
        m = greedy(target, pair, prompt, mid, stop_at=a)
        if m == a:
            lo = mid
        else:
            hi, b = mid, greedy(target, pair, prompt, mid)
    j = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    seq = list(prompt) + a[:j]
    with torch.no_grad():
        t = target(torch.tensor([seq])).logits[0, -1].double()
    o = pair.offset(seq).double()
    x, y = a[j], b[j]
    if o[x] == o[y]:
        return None
    alpha = float((t[y] - t[x]) / (o[x] - o[y]))  # t_x + alpha o_x == t_y + alpha o_y
    if greedy(target, pair, prompt, alpha)[:j] != a[:j]:
        return None
    top2 = canonical_scores(target, pair, seq, alpha).topk(2).values
    return (alpha, j) if float(top2[0] - top2[1]) < 1e-5 else None


def test_speculative_equals_per_token_at_forced_near_ties_on_many_prompts(client, pair, tokenizer, target):
    from mira.data.synthetic import generate_suite

    records = generate_suite(40, seed=9)
    prompts = [prompt_ids(tokenizer, r.instruction, r.input) for r in records]
    prompts = [p for p in prompts if len(p) + NEW < CONTEXT]
    ties = fallbacks = positions = unguarded_diverged = 0
    for prompt in prompts:
        found = tie_alpha(target, pair, prompt)
        if found is None:
            continue
        alpha, _ = found
        ties += 1
        settings = dict(max_new_tokens=NEW, alpha=alpha, draft=DraftSchedule(initial=4, minimum=1, maximum=16))
        slow = make_decoder("per-token", client, pair, tokenizer, eos_ids=set()).generate(
            prompt, DecodeSettings(**settings))
        fast = make_decoder("speculative", client, pair, tokenizer, eos_ids=set()).generate(
            prompt, DecodeSettings(**settings))
        assert fast.token_ids == slow.token_ids, f"alpha={alpha!r}"
        unguarded = make_decoder("speculative", client, pair, tokenizer, eos_ids=set()).generate(
            prompt, DecodeSettings(**settings, exact_margin=0.0))
        unguarded_diverged += unguarded.token_ids != slow.token_ids
        fallbacks += fast.metrics.fallbacks
        positions += fast.metrics.new_tokens
        if ties >= 20:
            break
    print(f"\nnear-ties forced: {ties} prompts; fallbacks {fallbacks}/{positions} positions; "
          f"without the check {unguarded_diverged} diverged")
    assert ties >= 20
    assert fallbacks >= 1  # the forced ties really went through the canonical path
