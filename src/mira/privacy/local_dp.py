"""Local client-level DP: each client clips its update and adds Gaussian noise *before* the upload
leaves it, so the server (and every other client, who may later receive adapters built from it)
only ever sees a private upload.

This is what DP protects under MIRA, whose server keeps one adapter per client and mixes each with
its neighbours (the Laplacian step): the server never needs a sum it could noise, so the noise must
be on each upload. Client k sends ``start_k + clip(Delta_k, C) + N(0, (z C)^2 I)``; everything the
server does afterwards (graph, Laplacian step, the adapters it sends back) is post-processing.

Accounting per client (see ``accountant.local_event``): sensitivity 2C (replace-one of the client's
whole dataset), no amplification by sampling (the server knows who uploaded), composed over the
rounds the client actually took part in. ``epsilon`` in the report is the largest over clients; a
target ``epsilon`` calibrates z for a client that takes part in every round.
"""
from __future__ import annotations

import math

from mira.privacy.accountant import calibrate, epsilon, finite_or_none, local_event
from mira.privacy.base import ClientMechanism, gaussian_like, register_mechanism
from mira.errors import MiraError


@register_mechanism
class LocalDP(ClientMechanism):
    mode = "local"

    def __init__(self, cfg, **kw):
        if cfg.adaptive is not None:
            raise MiraError("adaptive clipping needs the server to see the update norms; local DP keeps them on "
                            "the client: remove privacy.client.adaptive or use mode: central", where="privacy.client.adaptive")
        super().__init__(cfg, **kw)

    def noise_multiplier(self) -> float:
        c = self.cfg
        if c.noise_multiplier is not None:
            return float(c.noise_multiplier)
        return calibrate(lambda z: local_event(z, self.rounds), c.epsilon, self.delta, "privacy.client.epsilon")

    def client_upload(self, rnd: int, cid: int, start: dict, upload: dict, keys: list[str]) -> dict:
        delta, _ = self.clipped_delta(start, upload, keys, self.clip_norm)
        gen = self.generator(rnd, cid, 4_000_037)
        std = self.z * self.clip_norm
        self.participations[cid] += 1
        out = dict(upload)
        for k in keys:
            noisy = start[k].double().to(delta[k].device) + delta[k] + gaussian_like(delta[k], std, gen)
            out[k] = noisy.to(upload[k].dtype)
        return out

    def client_epsilons(self) -> list[float]:
        if self.z <= 0:
            return [math.inf if n else 0.0 for n in self.participations]
        return [epsilon(local_event(self.z, n), self.delta) if n else 0.0 for n in self.participations]

    def report(self) -> dict:
        eps = self.client_epsilons()
        return {"level": "client", "mode": self.mode, "accountant": "dp_accounting RDP",
                "epsilon": finite_or_none(max(eps)) if eps else None,
                "epsilon_per_client": [finite_or_none(e) for e in eps], "delta": self.delta,
                "noise_multiplier": self.z, "clip_norm": self.clip_norm, "sensitivity": "2C (replace-one)",
                "rounds": self.rounds, "participations": list(self.participations)}
