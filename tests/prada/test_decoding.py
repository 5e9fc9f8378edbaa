"""Per-token and speculative decoding against a real server: same tokens, fewer round trips."""
from __future__ import annotations

import httpx
import pytest

from mira.prada.client import BlackBoxClient
from mira.prada.decoding import DECODERS, DecodeSettings, DraftSchedule, make_decoder
from mira.prada.errors import PradaError

from .conftest import API_KEY

NEW = 24


def run(mode, client, pair, tokenizer, prompt, **settings):
    decoder = make_decoder(mode, client, pair, tokenizer, eos_ids=set())  # no EOS: always NEW tokens
    return decoder.generate(prompt, DecodeSettings(max_new_tokens=NEW, **settings))


def test_both_decoders_are_registered_by_name():
    assert set(DECODERS) == {"per-token", "speculative", "session"}
    with pytest.raises(PradaError, match="unknown mode"):
        make_decoder("beam", None, None, None)


def test_speculative_gives_exactly_the_per_token_tokens_greedy(client, pair, tokenizer, prompts):
    drafted = accepted = trips = 0
    for prompt in prompts:
        slow = run("per-token", client, pair, tokenizer, prompt)
        fast = run("speculative", client, pair, tokenizer, prompt)
        assert fast.token_ids == slow.token_ids and fast.text == slow.text
        assert len(slow.token_ids) == NEW and slow.metrics.round_trips == NEW
        assert fast.metrics.round_trips <= NEW  # a draft yields its accepted tokens plus the device's own
        drafted, accepted, trips = (drafted + fast.metrics.drafted, accepted + fast.metrics.accepted,
                                    trips + fast.metrics.round_trips)
    assert 0 < accepted < drafted  # the adapter really changes the target's choices, and not always
    assert trips < NEW * len(prompts)


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_equal_tokens_hold_for_other_offset_weights(client, pair, tokenizer, prompts, alpha):
    slow = run("per-token", client, pair, tokenizer, prompts[0], alpha=alpha)
    fast = run("speculative", client, pair, tokenizer, prompts[0], alpha=alpha,
               draft=DraftSchedule(initial=2, minimum=1, maximum=32))
    assert fast.token_ids == slow.token_ids


def test_alpha_zero_is_the_target_alone_and_every_draft_token_is_accepted(client, pair, tokenizer, prompts):
    fast = run("speculative", client, pair, tokenizer, prompts[1], alpha=0.0)
    assert fast.metrics.acceptance_rate == 1.0
    # drafts of 4, 8, then the 12 tokens left, plus one /v1/logits per near-tie re-asked canonically
    assert fast.metrics.round_trips == 3 + fast.metrics.fallbacks
    direct = client.draft(prompts[1], NEW)
    assert fast.token_ids == direct.tokens


def test_top_k_mode_agrees_across_decoders_and_stays_on_the_support(client, pair, tokenizer, prompts):
    k = 3
    slow = run("per-token", client, pair, tokenizer, prompts[2], top_k=k)
    fast = run("speculative", client, pair, tokenizer, prompts[2], top_k=k)
    assert fast.token_ids == slow.token_ids
    seq = list(prompts[2])
    for token in slow.token_ids:
        support = client.logits([seq], top_k=k).ids[0].tolist()
        assert token in support
        seq.append(token)
    everything = run("per-token", client, pair, tokenizer, prompts[2], top_k=pair.vocab_size)
    assert everything.token_ids == run("per-token", client, pair, tokenizer, prompts[2]).token_ids
    assert slow.metrics.bytes_received < everything.metrics.bytes_received / 10


def test_seeded_sampling_is_reproducible_and_the_same_in_both_decoders(client, pair, tokenizer, prompts):
    slow = run("per-token", client, pair, tokenizer, prompts[3], temperature=1.0, seed=11)
    fast = run("speculative", client, pair, tokenizer, prompts[3], temperature=1.0, seed=11)
    again = run("speculative", client, pair, tokenizer, prompts[3], temperature=1.0, seed=11)
    other = run("per-token", client, pair, tokenizer, prompts[3], temperature=1.0, seed=12)
    assert slow.token_ids == fast.token_ids == again.token_ids
    assert other.token_ids != slow.token_ids


class Recording(httpx.BaseTransport):
    """A real HTTP transport that records every request and response body it carries."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.sent: list[int] = []
        self.received: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = response.read()
        self.sent.append(len(request.content))
        self.received.append(len(body))
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("mode", ["per-token", "speculative"])
def test_metrics_count_round_trips_and_http_body_bytes(server, pair, tokenizer, prompts, mode):
    transport = Recording()
    with BlackBoxClient(server.url, API_KEY, timeout=20, transport=transport) as client:
        gen = run(mode, client, pair, tokenizer, prompts[0])
    m = gen.metrics
    assert m.round_trips == len(transport.sent) and m.new_tokens == NEW
    assert m.bytes_sent == sum(transport.sent) and m.bytes_received == sum(transport.received)
    assert m.tokens_per_second > 0 and m.seconds >= m.server_seconds > 0
    if mode == "speculative":
        assert 0 <= m.acceptance_rate <= 1 and m.accepted <= m.drafted
    else:
        assert m.acceptance_rate is None and m.round_trips == NEW


def test_metrics_are_exact_against_a_scripted_server(pair, tokenizer):
    """A fake server (httpx.MockTransport) with known bodies: every byte is accounted for."""
    import torch

    from mira.prada.protocol import DraftResponse, LogitsResponse, encode_scores

    vocab = pair.vocab_size
    favourite = torch.full((1, vocab), -5.0)
    favourite[0, 7] = 50.0  # far beyond any offset: the device always agrees with the server
    bodies: list[tuple[int, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        payload = json.loads(request.content)
        if request.url.path == "/v1/logits":
            body = LogitsResponse(scores=encode_scores(favourite, None, "base64")).model_dump_json().encode()
        else:
            n = payload["n"]
            body = DraftResponse(tokens=[7] * n, stop="length",
                                 scores=encode_scores(favourite.repeat(n, 1), None, "base64")).model_dump_json().encode()
        bodies.append((len(request.content), len(body)))
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    for mode, trips in (("per-token", 10), ("speculative", 3)):  # drafts of 4, 4 and the 2 left
        bodies.clear()
        with BlackBoxClient("http://fake", API_KEY, transport=httpx.MockTransport(handler)) as client:
            gen = make_decoder(mode, client, pair, tokenizer, eos_ids=set()).generate(
                [1, 5, 6], DecodeSettings(max_new_tokens=10, draft=DraftSchedule(initial=4, minimum=1, maximum=4)))
        assert gen.token_ids == [7] * 10
        assert gen.metrics.round_trips == len(bodies) == trips
        assert gen.metrics.bytes_sent == sum(s for s, _ in bodies)
        assert gen.metrics.bytes_received == sum(r for _, r in bodies)
