"""The logit combination, the proxy pair, the token chooser and the draft schedule (no server)."""
from __future__ import annotations

import pytest
import torch

from mira.prada.decoding import DecodeSettings, DraftSchedule, TokenChooser
from mira.prada.errors import ContextLimitError, PradaError
from mira.prada.offset import ProxyPair, add_offset, combine, combine_on_support

from .conftest import CONTEXT


def test_combine_is_target_plus_alpha_times_the_proxy_difference():
    g = torch.Generator().manual_seed(0)
    target, tuned, base = (torch.randn(3, 11, generator=g) for _ in range(3))
    assert torch.allclose(combine(target, tuned, base, alpha=0.5), target + 0.5 * (tuned - base))
    assert torch.equal(combine(target, tuned, base, alpha=0.0), target)
    assert torch.equal(add_offset(target, tuned - base, 1.0), combine(target, tuned, base))


def test_top_k_mode_applies_the_offset_on_the_support_only():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    offset = torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0])  # the proxy loves token 3
    logprobs, ids = torch.log_softmax(logits, -1).topk(2)  # support {0, 1}: token 3 cannot be chosen
    scores = combine_on_support(logprobs, ids, offset, alpha=1.0)
    assert int(ids[scores.argmax()]) == 0
    assert int(add_offset(logits, offset).argmax()) == 3  # with the full vocabulary it would be
    full_support_lp, full_ids = torch.log_softmax(logits, -1).topk(5)  # k = vocab: same choice as full logits
    assert int(full_ids[combine_on_support(full_support_lp, full_ids, offset).argmax()]) == 3


def test_proxy_offsets_match_a_full_forward_at_every_position(pair):
    ids = [1, 17, 42, 9, 33, 60, 61, 5]
    incremental = []
    for end in range(3, len(ids) + 1):  # prompt of 3, then one token at a time
        incremental.append(pair.offset(ids[:end]))
    full = pair.teacher_forced_offsets(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, 2:]
    assert torch.allclose(torch.stack(incremental), full, atol=1e-4)
    assert full.abs().max() > 0.1  # the trained adapter really moves the logits
    assert torch.allclose(pair.offset(ids[:4]), incremental[1], atol=1e-5)  # a shorter sequence starts over


def test_an_untrained_adapter_gives_a_zero_offset(zoo):
    from peft import get_peft_model

    from mira.models.adapters import lora_settings_to_peft
    from mira.models.loader import load_base

    base, _ = load_base(str(zoo.proxy))
    fresh = ProxyPair(get_peft_model(base, lora_settings_to_peft(base, 4, 8, 0.0, None)))
    assert torch.equal(fresh.offset([1, 2, 3]), torch.zeros(fresh.vocab_size))


def test_the_proxy_refuses_sequences_longer_than_its_context(pair):
    with pytest.raises(ContextLimitError, match="proxy's context"):
        pair.offset([1] * (CONTEXT + 1))


def test_the_chooser_is_greedy_or_seeded():
    scores = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert TokenChooser(0.0, seed=1)(scores) == 1
    a, b = TokenChooser(1.0, seed=7), TokenChooser(1.0, seed=7)
    assert [a(scores) for _ in range(30)] == [b(scores) for _ in range(30)]
    assert len({TokenChooser(1.0, seed=s)(scores) for s in range(20)}) > 1


def test_the_draft_length_grows_when_all_are_accepted_and_shrinks_on_early_mismatch():
    s = DraftSchedule(initial=4, minimum=2, maximum=8)
    assert s.next(4, accepted=4, proposed=4) == 8
    assert s.next(8, accepted=8, proposed=8) == 8  # bounded
    assert s.next(8, accepted=1, proposed=8) == 4
    assert s.next(2, accepted=0, proposed=2) == 2  # bounded below
    assert s.next(8, accepted=5, proposed=8) == 8  # late mismatch: keep
    with pytest.raises(PradaError, match="draft lengths"):
        DraftSchedule(initial=9, minimum=1, maximum=8)
    with pytest.raises(PradaError, match="max_new_tokens"):
        DecodeSettings(max_new_tokens=0)
