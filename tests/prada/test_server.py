"""The black-box server over real HTTP: health, auth, bounded requests, and what it computes."""
from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from mira.prada.protocol import DraftResponse, LogitsResponse, decode_scores

from .conftest import API_KEY, CONTEXT

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def target(zoo):
    return AutoModelForCausalLM.from_pretrained(zoo.target).eval()


def post(server, path: str, payload, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=payload, headers=headers, timeout=20)


def test_health_needs_no_key_and_shows_only_public_facts(server):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"status", "model_type", "vocab_size", "context_length", "eos_token_ids", "max_batch",
                         "max_draft", "sessions", "session_ttl", "max_sessions_per_key"}
    assert body["context_length"] == CONTEXT and body["max_draft"] == 32 and body["max_batch"] == 4


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"X-API-Key": API_KEY}])
@pytest.mark.parametrize("path, payload", [("/v1/logits", {"prefixes": [[1, 5]]}),
                                           ("/v1/draft", {"prefix": [1, 5], "n": 2})])
def test_a_missing_or_wrong_key_is_401(server, headers, path, payload):
    r = post(server, path, payload, headers)
    assert r.status_code == 401
    assert r.json()["detail"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path, payload, code", [
    ("/v1/logits", {"prefixes": [[1, 200]]}, "unknown_token"),  # vocab is 200
    ("/v1/logits", {"prefixes": [[1, -1]]}, "unknown_token"),
    ("/v1/logits", {"prefixes": [[1] * (CONTEXT + 1)]}, "context_exceeded"),
    ("/v1/logits", {"prefixes": [[]]}, "empty_prefix"),
    ("/v1/logits", {"prefixes": []}, "bad_batch"),
    ("/v1/logits", {"prefixes": [[1]] * 5}, "bad_batch"),  # max_batch 4
    ("/v1/logits", {"prefixes": [[1, 2.5]]}, "invalid_request"),
    ("/v1/logits", {"prefixes": [[1, "7"]]}, "invalid_request"),
    ("/v1/logits", {"prefixes": [[1]], "top_k": 0}, "bad_top_k"),
    ("/v1/logits", {"prefixes": [[1]], "top_k": 201}, "bad_top_k"),
    ("/v1/logits", {"prefixes": [[1]], "weights": True}, "invalid_request"),
    ("/v1/draft", {"prefix": [1, 5], "n": 0}, "bad_n"),
    ("/v1/draft", {"prefix": [1, 5], "n": 33}, "bad_n"),  # max_draft 32
    ("/v1/draft", {"prefix": [1, 999], "n": 2}, "unknown_token"),
    ("/v1/draft", {"prefix": [1] * (CONTEXT + 1), "n": 1}, "context_exceeded"),
    ("/v1/draft", {"prefix": [1, 5]}, "invalid_request"),
])
def test_bad_requests_are_422_with_a_code(server, path, payload, code):
    r = post(server, path, payload)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["code"] == code


def test_request_bodies_are_bounded(server):
    r = httpx.post(f"{server.url}/v1/logits", content=b"{" + b" " * (1 << 20) + b"}", headers=AUTH, timeout=20)
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/v1/logits", content=b"not json", headers={**AUTH, "Content-Type": "application/json"},
                   timeout=20)
    assert r.status_code == 422


def test_logits_are_the_models_next_token_logits(server, target):
    prefixes = [[1, 17, 42, 9], [1, 5], [1, 100, 101, 102, 103, 104]]
    with torch.no_grad():
        expected = torch.stack([target(torch.tensor([p])).logits[0, -1] for p in prefixes])
    full = decode_scores(LogitsResponse.model_validate(post(server, "/v1/logits", {"prefixes": prefixes}).json()).scores)
    assert full.ids is None and torch.allclose(full.values, expected, atol=1e-5)
    as_list = post(server, "/v1/logits", {"prefixes": prefixes, "encoding": "list"}).json()
    assert torch.equal(decode_scores(LogitsResponse.model_validate(as_list).scores).values, full.values)
    top = decode_scores(LogitsResponse.model_validate(
        post(server, "/v1/logits", {"prefixes": prefixes, "top_k": 5}).json()).scores)
    want_values, want_ids = torch.log_softmax(expected, -1).topk(5)
    assert torch.equal(top.ids, want_ids) and torch.allclose(top.values, want_values, atol=1e-5)


def test_draft_is_greedy_with_the_logits_of_each_position(server, target):
    prefix = [1, 17, 42, 9]
    draft = DraftResponse.model_validate(post(server, "/v1/draft", {"prefix": prefix, "n": 6}).json())
    scores = decode_scores(draft.scores)
    assert len(draft.tokens) == scores.rows
    seq = list(prefix)
    with torch.no_grad():
        for i, token in enumerate(draft.tokens):
            logits = target(torch.tensor([seq])).logits[0, -1]
            assert torch.allclose(scores.values[i], logits, atol=1e-4)
            assert token == int(logits.argmax())
            seq.append(token)
    assert draft.stop == ("eos" if draft.tokens[-1] == 2 else "length")


def test_draft_stops_at_the_end_of_the_context(server):
    prefix = [1] + [7] * (CONTEXT - 3)  # room for 3 more tokens, then the sequence is CONTEXT + 1 long
    r = post(server, "/v1/draft", {"prefix": prefix, "n": 10})
    draft = DraftResponse.model_validate(r.json())
    if draft.stop != "eos":
        assert draft.stop == "context" and len(prefix) + len(draft.tokens) == CONTEXT + 1
