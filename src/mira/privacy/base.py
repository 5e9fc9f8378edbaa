"""Client-level DP mechanisms: a small class per mechanism, registered by ``privacy.client.mode``.

The engine calls a mechanism at three points of a round:

* ``sample(rnd, k)``: which clients train (central DP samples each client with probability q,
  the sampling its accountant assumes; ``None`` keeps the engine's own sample);
* ``client_upload(rnd, cid, start, upload, keys)``: on the client, before the upload leaves it
  (local DP clips and noises here);
* ``server_aggregate(rnd, results, start)``: on the server, before the strategy aggregates
  (central DP clips, sums, noises here and hands the strategy one private mean).

``state_dict`` holds what resume needs (adaptive clip norm, participation counts), so a resumed
run is the same run; ``report()`` is what ``summary.json`` states (epsilon, delta, C, z).
The noise is drawn from generators seeded by ``(seed, round, client)``, like the training batches.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from mira.errors import MiraError

CLIENT_MECHANISMS: dict[str, type["ClientMechanism"]] = {}


def register_mechanism(cls):
    CLIENT_MECHANISMS[cls.mode] = cls
    return cls


def flat_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def gaussian_like(t: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    return (noise * std).to(t.device, t.dtype)


_SECURE_SEED: list[int] = []


def secure_seed() -> int:
    import os

    if not _SECURE_SEED:
        _SECURE_SEED.append(int.from_bytes(os.urandom(16), "little"))
    return _SECURE_SEED[0]


def generator(*parts: int) -> torch.Generator:
    from mira.federated.engine import derive_seed  # the engine's one seed derivation

    return torch.Generator().manual_seed(derive_seed(*parts))


class ClientMechanism:
    mode: ClassVar[str]

    def __init__(self, cfg, *, num_clients: int, fraction: float, rounds: int, seed: int):
        from mira.privacy.accountant import default_delta

        self.cfg, self.k, self.q, self.rounds, self.seed = cfg, num_clients, fraction, rounds, seed
        self.delta = cfg.delta if cfg.delta is not None else default_delta(num_clients)
        self.clip_norm = float(cfg.clip_norm)
        self.participations = [0] * num_clients
        self.secure = False  # privacy.secure_noise (set by build_client_mechanism)
        self.z = self.noise_multiplier()

    def noise_seed(self) -> int:
        """The root of every noise and sampling draw: the run's seed (exact resume; a simulation), or, with
        ``privacy.secure_noise``, 128 bits from ``os.urandom`` drawn once per process (not derivable from the
        config, so that no party knowing it can subtract the noise; a resumed run then draws new noise)."""
        return secure_seed() if self.secure else self.seed

    def generator(self, *parts: int) -> torch.Generator:
        return generator(self.noise_seed(), *parts)

    @classmethod
    def check_strategy(cls, strategy_cls) -> None:
        """Refuse, in one line, a strategy this mechanism cannot protect."""

    def noise_multiplier(self) -> float:
        raise NotImplementedError

    def sample(self, rnd: int, k: int) -> list[int] | None:
        return None

    def client_upload(self, rnd: int, cid: int, start: dict, upload: dict, keys: list[str]) -> dict:
        return upload

    def server_aggregate(self, rnd: int, results: dict, start: dict | None, keys: list[str]) -> tuple[dict, dict]:
        return results, {}

    def clipped_delta(self, start: dict, upload: dict, keys: list[str], clip: float) -> tuple[dict, float]:
        """``clip(upload - start)`` to L2 norm ``clip`` over all ``keys`` together (Flower's FlatClip)."""
        delta = {k: upload[k].double() - start[k].to(upload[k].device).double() for k in keys}
        norm = flat_norm(list(delta.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        return {k: v * scale for k, v in delta.items()}, norm

    def report(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"clip_norm": self.clip_norm, "participations": list(self.participations)}

    def load_state_dict(self, state: dict) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.participations = [int(x) for x in state["participations"]]


def check_privacy(cfg, strategy_cls, n_train: list[int]) -> None:
    """Build (and drop) the run's mechanisms, so that ``mira compare`` / ``mira tune`` refuse bad privacy
    settings before the first run starts (the training-set sizes are counted before the length policy)."""
    if not cfg.privacy.enabled:
        return
    build_client_mechanism(cfg, strategy_cls, num_clients=len(n_train), fraction=cfg.federation.fraction,
                           rounds=cfg.federation.rounds, seed=cfg.seed)
    from mira.privacy.dp_sgd import build_sample_mechanism

    build_sample_mechanism(cfg, strategy_cls, n_train, rounds=cfg.federation.rounds)


def build_client_mechanism(cfg, strategy_cls, *, num_clients: int, fraction: float, rounds: int,
                           seed: int) -> ClientMechanism | None:
    """The mechanism ``privacy.client`` asks for (``None`` when it is absent), checked against the
    strategy and the federation before anything runs."""
    pc = cfg.privacy.client
    if pc is None:
        return None
    from mira.privacy import dp_fedavg, local_dp  # noqa: F401  (registration)

    cls = CLIENT_MECHANISMS[pc.mode]
    if getattr(strategy_cls, "pooled", False) or not getattr(strategy_cls, "exchanges", True):
        raise MiraError(f"{strategy_cls.name} uploads no client update, so client-level DP has nothing to protect",
                        where="privacy.client")
    cls.check_strategy(strategy_cls)
    if pc.mode == "central" and cfg.algorithm.params().get("aggregation") == "exact":
        raise MiraError("central DP releases one noisy mean of the A and B updates, so there are no client products "
                        "to average exactly: use aggregation: fedavg", where="algorithm.aggregation")
    if cfg.lora.ranks:
        raise MiraError("client-level DP with per-client LoRA ranks (lora.ranks) is not supported: the clip and the "
                        "noise are defined on one adapter shape", where="privacy.client")
    mech = cls(pc, num_clients=num_clients, fraction=fraction, rounds=rounds, seed=seed)
    mech.secure = bool(cfg.privacy.secure_noise)
    return mech
