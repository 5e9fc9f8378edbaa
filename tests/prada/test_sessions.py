"""Server sessions (KV cache kept between requests), compact score encodings, adaptive drafts.

Lifecycle tests run the app in process (Starlette's TestClient, the same ASGI stack and
``Guard`` as ``mira serve``) so that the store's clock can be moved; the exactness tests use
the real ``mira serve`` process of the test session.
"""
from __future__ import annotations

import math

import httpx

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from mira.prada.client import BlackBoxClient
from mira.prada.decoding import (
    AcceptanceRate,
    DecodeSettings,
    DraftSchedule,
    best_draft_length,
    expected_tokens,
    make_decoder,
    prompt_ids,
)
from mira.prada.errors import ServerRejected
from mira.prada.protocol import decode_scores, encode_scores
from mira.prada.server import ServerLimits, create_app, top_k_logprobs
from mira.prada.sessions import SessionStore, owner_of

from .conftest import API_KEY, CONTEXT

KEY_A, KEY_B = "key-alice-0123456789", "key-bob-9876543210"
NEW = 20


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- the store alone -------------------------------------------------------------------------------
def _add(store, owner, n_tokens=4):
    class Cache:  # stands in for a KV cache: only its size matters to the store
        layers = []

    return store.add(owner, list(range(n_tokens)), Cache(), torch.zeros(n_tokens * 25), canonical=True)


def test_store_time_to_live_counts_memory_and_ownership():
    clock = Clock()
    store = SessionStore(ttl=10, max_sessions=3, max_per_key=2, max_bytes=10 ** 6, clock=clock)
    a1 = _add(store, "a")
    clock.t += 6
    a2 = _add(store, "a")
    assert store.get("b", a1.id) is None  # another key neither uses nor sees it (nor refreshes it)
    assert store.get("a", a1.id) is a1  # idle 6 s < 10: alive, and now used again
    clock.t += 6
    assert store.get("a", a2.id) is a2 and store.get("a", a1.id) is a1
    clock.t += 11
    assert store.get("a", a1.id) is None and store.get("a", a2.id) is None  # both idle 11 s > ttl
    assert store.evictions["ttl"] == 2 and store.count() == 0

    a1 = _add(store, "a")
    clock.t += 1
    a2 = _add(store, "a")
    clock.t += 1
    store.get("a", a1.id)  # a2 is now a's least recently used
    clock.t += 1
    a3 = _add(store, "a")  # a's third: a2 goes, no other key's
    assert store.get("a", a2.id) is None and store.count("a") == 2 and store.evictions["per_key_limit"] == 1
    clock.t += 1
    b1 = _add(store, "b")  # 3 in all: a1 (used at +2), a3 (+3), b1 (+4)
    clock.t += 1
    b2 = _add(store, "b")  # the global bound: the least recently used of any key, a1
    assert {s.id for s in store.sessions.values()} == {a3.id, b1.id, b2.id}
    assert store.evictions["count_limit"] == 1
    assert store.close("b", b2.id) is True and store.close("b", b2.id) is False
    assert store.close("a", b1.id) is False and b1.id in store.sessions  # not a's to close

    # memory: each session here holds a 100-float row, 400 bytes; 1000 bytes fit two
    store = SessionStore(ttl=10, max_sessions=10, max_per_key=10, max_bytes=1000, clock=clock)
    m1 = _add(store, "a")
    clock.t += 1
    m2 = _add(store, "b")
    clock.t += 1
    m3 = _add(store, "a")
    assert set(store.sessions) == {m2.id, m3.id} and store.evictions["memory_limit"] == 1
    assert store.total_bytes == 800 and m1.cache is None  # the evicted session's cache is released
    big = _add(store, "c", n_tokens=11)  # 1,100 bytes alone: over the bound, dropped (the others stay)
    assert big.id not in store.sessions and store.evictions["too_large"] == 1 and store.count() == 2


# -- the app in process: lifecycle over HTTP ------------------------------------------------------------
@pytest.fixture(scope="module")
def target(zoo):
    return AutoModelForCausalLM.from_pretrained(zoo.target).eval()


def local_app(target, **limits):
    app = create_app(target, [KEY_A, KEY_B], ServerLimits(**limits))
    return app, TestClient(app)


class Via(httpx.BaseTransport):
    """An httpx transport that hands each request to the in-process app (a ``TestClient``)."""

    def __init__(self, http: TestClient):
        self.http = http

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.http.request(request.method, request.url.raw_path.decode(), content=request.read(),
                              headers={k: v for k, v in request.headers.items() if k.lower() != "host"})
        return httpx.Response(r.status_code, headers=list(r.headers.items()), content=r.content)


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_a_session_belongs_to_its_key_and_closes(target):
    app, http = local_app(target)
    r = http.post("/v1/sessions", json={"prefix": [1, 17, 42], "n": 3}, headers=auth(KEY_A))
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    assert r.json()["length"] == 3 and len(r.json()["draft"]["tokens"]) == 3 and r.json()["draft"]["first_canonical"]
    unknown = http.post("/v1/sessions/nope/draft", json={"tokens": [5], "n": 2}, headers=auth(KEY_A))
    assert unknown.status_code == 404 and unknown.json()["detail"]["code"] == "unknown_session"
    for method, path, body in [("POST", f"/v1/sessions/{sid}/draft", {"tokens": [5], "n": 2}),
                               ("POST", f"/v1/sessions/{sid}/logits", {"tokens": []}),
                               ("DELETE", f"/v1/sessions/{sid}", None)]:
        other = http.request(method, path, json=body, headers=auth(KEY_B))
        assert other.status_code == 404 and other.json() == unknown.json()  # same answer as an unknown id
        assert http.request(method, path, json=body).status_code == 401  # no key at all
    assert app.state.box.sessions.get(owner_of(KEY_A), sid) is not None  # untouched by B
    r = http.post(f"/v1/sessions/{sid}/draft", json={"tokens": [5], "n": 2}, headers=auth(KEY_A))
    assert r.status_code == 200 and r.json()["length"] == 4
    assert http.delete(f"/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 204
    assert http.delete(f"/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 404
    assert http.post(f"/v1/sessions/{sid}/draft", json={"tokens": [], "n": 1}, headers=auth(KEY_A)).status_code == 404
    assert app.state.box.sessions.count() == 0


def test_sessions_expire_and_are_bounded_in_count_and_memory(target):
    app, http = local_app(target, session_ttl=30, max_sessions=3, max_sessions_per_key=2, max_session_bytes=9000)
    clock = Clock()
    store = app.state.box.sessions
    store.clock = clock

    def open_(key, prefix):
        r = http.post("/v1/sessions", json={"prefix": prefix}, headers=auth(key))
        return r.json()["session_id"] if r.status_code == 200 else r

    def alive(key, sid):
        return http.post(f"/v1/sessions/{sid}/logits", json={"tokens": []}, headers=auth(key)).status_code == 200

    s1 = open_(KEY_A, [1, 5, 6])
    clock.t += 31
    assert not alive(KEY_A, s1) and store.evictions["ttl"] == 1  # idle past its time to live
    a1, a2 = open_(KEY_A, [1, 5]), open_(KEY_A, [1, 6])
    clock.t += 1
    a3 = open_(KEY_A, [1, 7])  # a's third: a1 (least recently used) goes
    assert not alive(KEY_A, a1) and alive(KEY_A, a2) and alive(KEY_A, a3)
    clock.t += 1
    b1 = open_(KEY_B, [1, 8])
    assert store.count() == 3
    # memory: a session of 2 tokens holds 2 layers x 2 (k, v) x 2 heads x 8 dims x 4 B x 3 + a logits row of 4 x vocab
    per = store.sessions[b1].nbytes
    assert per == 2 * 2 * 2 * 8 * 4 * 2 + 4 * target.config.vocab_size
    assert store.total_bytes <= 9000
    r = http.post(f"/v1/sessions/{b1}/draft", json={"tokens": list(range(10, 30)), "n": 4}, headers=auth(KEY_B))
    assert r.status_code == 200  # grew to 25 tokens (7,200 bytes): others evicted to make room, b1 kept
    assert store.total_bytes <= 9000 and store.evictions["memory_limit"] >= 1 and alive(KEY_B, b1)
    r = http.post(f"/v1/sessions/{b1}/draft", json={"tokens": list(range(10, 70)), "n": 4}, headers=auth(KEY_B))
    assert r.status_code == 413 and r.json()["detail"]["code"] == "session_too_large"
    assert not alive(KEY_B, b1) and store.total_bytes <= 9000


def test_a_session_request_carries_only_the_new_tokens(server):
    with BlackBoxClient(server.url, API_KEY, timeout=20) as c:
        long_prompt = [1] + list(range(10, 90))
        sid, first = c.open_session(long_prompt, 2)
        before = c.traffic.copy()
        c.session_draft(sid, first.tokens, 2)
        sent = c.traffic.minus(before).bytes_sent
        assert sent < 80  # {"tokens":[a,b],"n":2,"top_k":null,"encoding":"base64"}: no prefix
        assert c.traffic.header_bytes_sent > 0 and c.traffic.header_bytes_received > 0
        c.close_session(sid)


def test_session_rows_after_a_rollback_match_a_fresh_stateless_draft(server):
    with BlackBoxClient(server.url, API_KEY, timeout=20) as c:
        prefix = [1, 17, 42, 9, 33]
        sid, draft = c.open_session(prefix, 5)
        assert torch.equal(draft.scores.values[0], c.logits([prefix]).values[0])  # prefill: canonical row 0
        other = next(t for t in range(4, 100) if t != draft.tokens[2])
        kept = draft.tokens[:2] + [other]  # keep two draft tokens, then the device's own
        cached = c.session_draft(sid, kept, 4)
        fresh = c.draft(prefix + kept, 4)
        assert cached.tokens == fresh.tokens and cached.length == len(prefix) + 3 and not cached.first_canonical
        assert float((cached.scores.values - fresh.scores.values).abs().max()) < 1e-4
        canon = c.session_logits(sid, cached.tokens[:2], canonical=True)
        assert torch.equal(canon.values[0], c.logits([prefix + kept + cached.tokens[:2]]).values[0])
        c.close_session(sid)


# -- encodings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding, ratio", [("f16", 0.5), ("q8", 0.25)])
@pytest.mark.parametrize("vocab", [512, 49152, 70000])
def test_compact_encodings_round_trip_within_their_bound(encoding, ratio, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g) * 4
    for values, ids in [(logits, None), top_k_logprobs(logits, 64)]:
        packed = encode_scores(values, ids, encoding)
        back = decode_scores(packed)
        err = (back.values.double() - values.double()).abs().amax(dim=1)
        assert bool((err <= back.error).all()), (err, back.error)
        assert bool((back.error > 0).all())
        exact = decode_scores(encode_scores(values, ids, "base64"))
        assert torch.equal(exact.values, values) and bool((exact.error == 0).all())
        if ids is not None:
            assert torch.equal(back.ids, ids)
            assert packed.id_dtype == ("u2" if vocab <= 65536 else "i4")
        # q8 adds an 8-byte (lo, scale) header per row
        assert len(packed.values) <= ratio * len(encode_scores(values, None, "base64").values) + 16 + 12 * 6
    if encoding == "q8":  # each value within half a step of (max - min) / 255
        row = decode_scores(encode_scores(logits[:1], None, "q8"))
        assert float(row.error[0]) <= float(logits[0].max() - logits[0].min()) / 510 * 1.001


def test_a_malformed_compact_payload_is_refused():
    packed = encode_scores(torch.randn(2, 8), None, "q8")
    with pytest.raises(ValueError):
        decode_scores(packed.model_copy(update={"values": packed.values.split(".")[0]}))
    with pytest.raises(ValueError):
        decode_scores(packed.model_copy(update={"rows": 3}))
    values, ids = top_k_logprobs(torch.randn(2, 40), 4)
    packed = encode_scores(values, ids, "f16")
    with pytest.raises(ValueError):
        decode_scores(packed.model_copy(update={"ids": None}))


# -- adaptive draft length -----------------------------------------------------------------------------
def test_the_draft_length_follows_the_acceptance_rate():
    assert best_draft_length(0.0, 1, 16, 0.1) == 1
    assert best_draft_length(1.0, 1, 16, 0.0) == 16
    lengths = [best_draft_length(p, 1, 32, 0.1) for p in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert math.isclose(expected_tokens(0.5, 3), 1 + 0.5 + 0.25)
    rate = AcceptanceRate(decay=0.5)
    assert rate.estimate == 0.5
    for _ in range(6):
        rate.update(8, 0)
    high = rate.estimate
    for _ in range(10):
        rate.update(0, 1)
    assert high > 0.9 and rate.estimate < 0.25
    schedule = DraftSchedule(initial=4, minimum=1, maximum=16, rule="rate")
    assert schedule.next(4, 0, 4, rate) <= 2 and best_draft_length(0.05, 1, 16, 0.1) == 1


def test_rate_rule_grows_drafts_when_everything_is_accepted(client, pair, tokenizer, prompts):
    settings = DecodeSettings(max_new_tokens=NEW, alpha=0.0, draft=DraftSchedule(initial=2, maximum=16, rule="rate"))
    gen = make_decoder("session", client, pair, tokenizer, eos_ids=set()).generate(prompts[1], settings)
    assert gen.metrics.acceptance_rate == 1.0
    # open (2 tokens), then drafts of the estimated best length: far fewer than NEW round trips (+1 close)
    assert gen.metrics.round_trips - gen.metrics.fallbacks <= 6


# -- the session decoder gives exactly the per-token tokens -------------------------------------------------
CASES = [dict(), dict(top_k=3), dict(temperature=0.8, seed=3), dict(top_k=5, temperature=1.0, seed=1),
         dict(top_k=4, encoding="q8"), dict(encoding="f16"), dict(alpha=2.0, draft=DraftSchedule(1, 1, 32, "rate"))]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_session_decoder_equals_per_token(client, pair, tokenizer, prompts, case):
    for prompt in prompts:
        ref = {k: v for k, v in case.items() if k not in ("encoding", "draft")}
        slow = make_decoder("per-token", client, pair, tokenizer, eos_ids=set()).generate(
            prompt, DecodeSettings(max_new_tokens=NEW, **ref))
        fast = make_decoder("session", client, pair, tokenizer, eos_ids=set()).generate(
            prompt, DecodeSettings(max_new_tokens=NEW, **case))
        assert fast.token_ids == slow.token_ids
        # each draft yields at least one token; plus the close and the canonical re-asks
        assert fast.metrics.round_trips <= NEW + 1 + fast.metrics.fallbacks


def test_session_decoder_equals_per_token_at_forced_near_ties(client, pair, tokenizer, target):
    from mira.data.synthetic import generate_suite

    from .test_exactness import NEW as TIE_NEW
    from .test_exactness import tie_alpha

    records = generate_suite(24, seed=9)
    ties = fallbacks = 0
    for r in records:
        prompt = prompt_ids(tokenizer, r.instruction, r.input)
        if len(prompt) + TIE_NEW >= CONTEXT or (found := tie_alpha(target, pair, prompt)) is None:
            continue
        ties += 1
        settings = dict(max_new_tokens=TIE_NEW, alpha=found[0])
        slow = make_decoder("per-token", client, pair, tokenizer, eos_ids=set()).generate(
            prompt, DecodeSettings(**settings))
        fast = make_decoder("session", client, pair, tokenizer, eos_ids=set()).generate(
            prompt, DecodeSettings(**settings))
        assert fast.token_ids == slow.token_ids, f"alpha={found[0]!r}"
        fallbacks += fast.metrics.fallbacks
        if ties >= 8:
            break
    print(f"\nsession decoder at forced near-ties: {ties} prompts, {fallbacks} canonical re-asks")
    assert ties >= 6 and fallbacks >= 1


def test_the_session_decoder_reopens_a_dropped_session(target, pair, tokenizer, prompts):
    app, http = local_app(target)
    store = app.state.box.sessions
    with BlackBoxClient("http://testserver", KEY_A, transport=Via(http)) as c:
        slow = make_decoder("per-token", c, pair, tokenizer, eos_ids=set()).generate(
            prompts[0], DecodeSettings(max_new_tokens=NEW))

        def drop(_token, run):
            if len(run.generated) in (5, 12):
                for sid in list(store.sessions):
                    store._drop(sid, "test")

        fast = make_decoder("session", c, pair, tokenizer, eos_ids=set()).generate(
            prompts[0], DecodeSettings(max_new_tokens=NEW), on_token=drop)
    assert fast.token_ids == slow.token_ids
    assert fast.metrics.reopened >= 1 and store.count() == 0  # and the last one was closed


def test_session_errors_are_rejections_with_codes(client):
    with pytest.raises(ServerRejected) as e:
        client.session_draft("no-such-session", [1], 2)
    assert e.value.status == 404 and e.value.code == "unknown_session"
    sid, _ = client.open_session([1, 5])
    with pytest.raises(ServerRejected) as e:
        client.session_draft(sid, [10 ** 6], 2)
    assert e.value.code == "unknown_token"
    with pytest.raises(ServerRejected) as e:
        client.session_draft(sid, list(range(4, 4 + CONTEXT)), 2)
    assert e.value.code == "context_exceeded"
    client.close_session(sid)
