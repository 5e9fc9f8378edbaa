"""Server-side sessions: a KV cache kept between requests, so a request carries only new tokens.

A ``Session`` holds the sequence its KV cache covers (``ids``: the tokens the client has
committed, then the draft tokens fed while drafting), the logits after its last token, and
who owns it (``owner``: a digest of the API key that opened it).

``SessionStore`` bounds them:

* **time to live**: a session idle for more than ``ttl`` seconds is dropped (checked on
  every access to the store, so no background thread is needed);
* **count**: at most ``max_per_key`` per API key (opening one more evicts that key's least
  recently used session) and ``max_sessions`` in all (opening one more evicts the least
  recently used session of any key; with ``max_per_key`` < ``max_sessions`` no key can
  hold them all);
* **memory**: the KV caches (and kept logits rows) of all sessions together stay under
  ``max_bytes``; a session that grows past the bound evicts the least recently used
  *other* sessions, and a session that alone needs more than ``max_bytes`` is dropped.

``get(owner, id)`` answers ``None`` for an unknown, expired, evicted, closed or *foreign*
session alike, so the server answers all of them with the same 404 and another key can
neither use a session nor learn that it exists. Evicting a session drops its cache
(the tensors are freed when the last reference goes). Not thread-safe on its own: the
server calls it under its model lock.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def owner_of(api_key: str | bytes) -> str:
    """The owner id of a key (a digest: the store never holds the key itself)."""
    raw = api_key.encode() if isinstance(api_key, str) else api_key
    return hashlib.sha256(raw).hexdigest()[:32]


def cache_bytes(cache) -> int:
    """Bytes held by a transformers KV cache (its key and value tensors)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of ``cache`` (in place)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


@dataclass
class Session:
    id: str
    owner: str
    ids: list[int]  # the sequence the cache covers
    committed: int  # how many of ``ids`` the client has sent (the rest were drafted here)
    cache: object
    last: torch.Tensor  # [vocab] logits after ids[-1]
    last_canonical: bool  # whether ``last`` came from one full forward of ``ids`` (the canonical row)
    created: float
    used: float
    nbytes: int = 0

    def measure(self) -> int:
        self.nbytes = cache_bytes(self.cache) + self.last.numel() * self.last.element_size()
        return self.nbytes


@dataclass
class SessionStore:
    ttl: float = 300.0
    max_sessions: int = 64
    max_per_key: int = 8
    max_bytes: int = 512 << 20
    clock: Callable[[], float] = time.monotonic
    sessions: dict[str, Session] = field(default_factory=dict)
    evictions: Counter = field(default_factory=Counter)  # reason -> count

    # -- lookup ------------------------------------------------------------------------------
    def purge(self) -> None:
        now = self.clock()
        for sid in [s.id for s in self.sessions.values() if now - s.used > self.ttl]:
            self._drop(sid, "ttl")

    def get(self, owner: str, sid: str) -> Session | None:
        """The caller's session, or None (unknown, expired, evicted, closed or another key's)."""
        self.purge()
        s = self.sessions.get(sid)
        if s is None or not secrets.compare_digest(s.owner, owner):
            return None
        s.used = self.clock()
        return s

    def close(self, owner: str, sid: str) -> bool:
        if self.get(owner, sid) is None:
            return False
        self._drop(sid, "closed")
        return True

    def count(self, owner: str | None = None) -> int:
        return sum(1 for s in self.sessions.values() if owner is None or s.owner == owner)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    # -- changes -------------------------------------------------------------------------------
    def add(self, owner: str, ids: list[int], cache, last: torch.Tensor, canonical: bool) -> Session:
        """A new session for ``owner``, making room by the rules above."""
        self.purge()
        while self.count(owner) >= self.max_per_key:
            self._drop(self._lru(owner=owner).id, "per_key_limit")
        while len(self.sessions) >= self.max_sessions:
            self._drop(self._lru().id, "count_limit")
        now = self.clock()
        s = Session(id=secrets.token_urlsafe(16), owner=owner, ids=list(ids), committed=len(ids), cache=cache,
                    last=last, last_canonical=canonical, created=now, used=now)
        self.sessions[s.id] = s
        self.fit(s)
        return s

    def fit(self, s: Session) -> bool:
        """Re-measure ``s`` after it changed and evict others until the memory bound holds;
        False (and ``s`` dropped) when ``s`` alone is over the bound."""
        s.measure()
        if s.nbytes > self.max_bytes:
            self._drop(s.id, "too_large")
            return False
        while self.total_bytes > self.max_bytes:
            self._drop(self._lru(exclude=s.id).id, "memory_limit")
        return True

    def _lru(self, owner: str | None = None, exclude: str | None = None) -> Session:
        return min((s for s in self.sessions.values() if (owner is None or s.owner == owner) and s.id != exclude),
                   key=lambda s: s.used)

    def _drop(self, sid: str, reason: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            s.cache = None  # free the tensors now, even if a reference to the Session lingers
            s.last = torch.empty(0)
            self.evictions[reason] += 1
