"""Settings of a Flower run that are not part of mira's YAML: where the ServerApp writes
the run directory and how long it waits for nodes. They travel in Flower's run config
(``[tool.flwr.app.config]`` of the generated app, or ``flwr run --run-config``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from mira.errors import MiraError


@dataclass
class RunSettings:
    out_dir: str = "runs/flower"
    # Per round (training or evaluation): stop waiting after this many seconds (0: no limit).
    round_timeout: float = 0.0
    # Once federation.min_clients sampled clients have replied, wait at most this many
    # seconds for the others (negative: wait for all, up to round_timeout).
    straggler_timeout: float = -1.0
    # At the start: how long to wait until every partition has a SuperNode.
    node_wait: float = 600.0
    resume: bool = False  # continue the run directory's checkpoint
    poll: float = 0.5  # seconds between pulls of replies

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
        if s.round_timeout < 0 or s.node_wait <= 0 or s.poll <= 0:
            raise MiraError("round-timeout must be >= 0, node-wait and poll > 0", where="run config")
        return s


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)
