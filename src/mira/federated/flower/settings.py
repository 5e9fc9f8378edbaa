"""Settings of a Flower run that are not part of mira's YAML: where the ServerApp writes
the run directory and how long it waits for nodes. They travel in Flower's run config
(``[tool.flwr.app.config]`` of the generated app, or ``flwr run --run-config``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from mira.errors import MiraError


ROUND_TIMEOUT = 1800.0  # seconds; the default deadline of one training or evaluation round
STRAGGLER_TIMEOUT = 120.0  # seconds to wait for the rest once the quorum has replied


def majority(n: int) -> int:
    """A strict majority of ``n`` sampled clients (0 of 0)."""
    return n // 2 + 1 if n > 0 else 0


@dataclass
class RunSettings:
    out_dir: str = "runs/flower"
    # Per round (training or evaluation): stop waiting after this many seconds (0: no limit,
    # which leaves a stalled node hanging the round for the messages' TTL).
    round_timeout: float = ROUND_TIMEOUT
    # Once the round's quorum (``min_clients``) has replied, wait at most this many seconds
    # for the others (negative: wait for all, up to round_timeout).
    straggler_timeout: float = STRAGGLER_TIMEOUT
    # The quorum of a round: at least this many of the sampled clients must reply, or the
    # run stops (its last checkpoint stays). 0: a strict majority of the sampled clients
    # (floor(n/2) + 1). ``federation.min_clients`` is a floor on top of it.
    min_clients: int = 0
    # Evaluation sends each node only its own adapter. True: every node receives every
    # distinct adapter, so the server can form each adapter's loss on the union of the test
    # sets (``global_loss``); this shows every client's personalised adapter to every node.
    cross_eval: bool = False
    # At the start: how long to wait until every partition has a SuperNode.
    node_wait: float = 600.0
    resume: bool = False  # continue the run directory's checkpoint
    poll: float = 0.2  # seconds between pulls of replies (a small loopback request; 0.5 added ~0.3 s a round)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("_", "-")

    def to_run_config(self) -> dict[str, Any]:
        return {self._key(k): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "RunSettings":
        kw = {}
        for f in fields(cls):
            key = cls._key(f.name)
            if key in rc:
                value = rc[key]
                try:
                    kw[f.name] = type(f.default)(value) if not isinstance(f.default, bool) else _bool(value)
                except (TypeError, ValueError):
                    raise MiraError(f"run config {key}={value!r} is not a {type(f.default).__name__}") from None
        s = cls(**kw)
        if s.round_timeout < 0 or s.node_wait <= 0 or s.poll <= 0 or s.min_clients < 0:
            raise MiraError("round-timeout and min-clients must be >= 0, node-wait and poll > 0", where="run config")
        return s

    def quorum(self, sampled: int, floor: int = 1) -> int:
        """How many of ``sampled`` clients must reply: ``min_clients`` (0: a strict majority),
        at least ``floor`` (``federation.min_clients``)."""
        return max(self.min_clients or majority(sampled), floor)


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)
