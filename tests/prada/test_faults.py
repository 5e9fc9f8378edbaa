"""Faults: each raises a clear ``PradaError`` that carries the text generated so far; nothing hangs."""
from __future__ import annotations

import signal
import time

import pytest

from mira.errors import MiraError
from mira.prada.client import BlackBoxClient
from mira.prada.decoding import DecodeSettings, DraftSchedule, make_decoder
from mira.prada.errors import (
    AuthenticationError,
    ContextLimitError,
    ServerRejected,
    ServerTimeout,
    ServerUnavailable,
)

from .conftest import API_KEY, CONTEXT, free_port

MODES = ["per-token", "speculative"]


def generate(mode, client, pair, tokenizer, prompt, on_token=None, **settings):
    settings.setdefault("max_new_tokens", 24)
    return make_decoder(mode, client, pair, tokenizer, eos_ids=set()).generate(prompt, DecodeSettings(**settings),
                                                                               on_token=on_token)


@pytest.mark.parametrize("mode", MODES)
def test_a_prompt_longer_than_the_context_is_refused(client, pair, tokenizer, mode):
    with pytest.raises(ContextLimitError, match="more than the model's context") as info:
        generate(mode, client, pair, tokenizer, [1] + [7] * CONTEXT)
    assert info.value.text == "" and info.value.token_ids == [] and info.value.status == 422
    assert isinstance(info.value, MiraError)


def test_running_into_the_context_raises_with_the_same_partial_text_in_both_modes(client, pair, tokenizer, prompts):
    errors = {}
    for mode in MODES:
        with pytest.raises(ContextLimitError) as info:
            generate(mode, client, pair, tokenizer, prompts[0], max_new_tokens=200)
        errors[mode] = info.value
    slow, fast = errors["per-token"], errors["speculative"]
    assert slow.token_ids == fast.token_ids and slow.text == fast.text
    assert len(slow.token_ids) == CONTEXT + 1 - len(prompts[0])  # the last forward used the whole context
    assert slow.text == tokenizer.decode(slow.token_ids, skip_special_tokens=True)
    assert "text so far" in str(slow) and slow.metrics.new_tokens == len(slow.token_ids)


@pytest.mark.parametrize("mode", MODES)
def test_unknown_token_ids_are_rejected(client, pair, tokenizer, mode):
    with pytest.raises(ServerRejected, match="outside the vocabulary") as info:
        generate(mode, client, pair, tokenizer, [1, 5, 4000])
    assert info.value.status == 422 and info.value.code == "unknown_token"


def test_a_draft_length_beyond_the_servers_limit_is_rejected(client, pair, tokenizer, prompts):
    with pytest.raises(ServerRejected, match=r"n must be in \[1, 32\]") as info:
        generate("speculative", client, pair, tokenizer, prompts[0], max_new_tokens=40,
                 draft=DraftSchedule(initial=40, minimum=1, maximum=40))
    assert info.value.code == "bad_n"


def test_a_wrong_key_is_an_authentication_error(server, pair, tokenizer, prompts):
    with BlackBoxClient(server.url, "not-the-key", timeout=10) as bad, pytest.raises(AuthenticationError, match="401"):
        generate("per-token", bad, pair, tokenizer, prompts[0])


def test_nobody_listening_is_server_unavailable(pair, tokenizer, prompts):
    t0 = time.monotonic()
    with BlackBoxClient(f"http://127.0.0.1:{free_port()}", API_KEY, timeout=5) as nobody, \
            pytest.raises(ServerUnavailable, match="cannot reach"):
        generate("speculative", nobody, pair, tokenizer, prompts[0])
    assert time.monotonic() - t0 < 5


def test_a_server_that_hangs_then_dies_mid_generation(own_server, client, pair, tokenizer, prompts):
    """Freeze the server (SIGSTOP) after 3 tokens: timeout. Thaw it, then kill it after 5 tokens."""
    reference = generate("per-token", client, pair, tokenizer, prompts[0]).token_ids  # the session server

    def freeze_after_3(token, run):
        if len(run.generated) == 3:
            own_server.freeze()

    with BlackBoxClient(own_server.url, API_KEY, timeout=2.0) as c:
        t0 = time.monotonic()
        with pytest.raises(ServerTimeout, match="no answer") as info:
            generate("per-token", c, pair, tokenizer, prompts[0], on_token=freeze_after_3)
        assert time.monotonic() - t0 < 30
    assert info.value.token_ids == reference[:3]
    assert info.value.text == tokenizer.decode(reference[:3], skip_special_tokens=True)
    assert repr(info.value.text) in str(info.value)

    own_server.proc.send_signal(signal.SIGCONT)

    def kill_after_5(token, run):
        if len(run.generated) == 5:
            own_server.kill()

    with BlackBoxClient(own_server.url, API_KEY, timeout=20) as c, pytest.raises(ServerUnavailable) as info:
        generate("speculative", c, pair, tokenizer, prompts[0], on_token=kill_after_5)
    partial = info.value.token_ids
    assert 5 <= len(partial) < len(reference) and partial == reference[: len(partial)]
    assert info.value.metrics.new_tokens == len(partial)
