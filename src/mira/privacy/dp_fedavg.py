"""Central client-level DP: DP-FedAvg (McMahan et al., ICLR 2018) with optional adaptive clipping
(Andrew et al., NeurIPS 2021), as Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers do.

Every round each client joins with probability ``q = federation.fraction`` (Poisson sampling,
which the accountant assumes). The server clips each update ``Delta_k = upload_k - global`` to
norm ``C``, and releases

    mean = (sum_k clip(Delta_k) + N(0, (z C)^2 I)) / (q K)

(the fixed-denominator estimator: dividing by the *expected* count keeps the sensitivity at
``C / (q K)`` whatever the sample). The strategy then aggregates this single private mean as if
one client had uploaded ``global + mean``, so FedIT/FedProx/FFA-LoRA set it as the new global and
the FedOpt family use it as their pseudo-gradient. A round in which nobody was sampled still
releases noise. Client weights are uniform (data-size weights would leak the sizes and raise the
sensitivity).

Adaptive clipping: each client's bit ``1[||Delta_k|| <= C] - 1/2`` (shifted, so that one client changes
their sum by at most 1/2) is summed, noised and normalised, ``b = (sum_k (bit_k - 1/2) + N(0, sigma_b^2)) / (q K)
+ 1/2`` (as TF Privacy's ``QuantileEstimatorQuery``), and ``C <- C exp(-lr (b - target_quantile))``; the
noise multiplier splits as ``z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` so that the pair costs what one
Gaussian with ``z`` does (Andrew et al., Thm 1, which needs the sensitivity 1/2 of the shifted bits). ``sigma_b`` defaults to ``qK / 20``. (Note: Flower 1.42 counts the
*clipped* updates in ``b`` with the same update rule, which drives C the wrong way; mira follows
the paper.)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mira.errors import MiraError
from mira.federated.strategies.base import FitRes
from mira.privacy.accountant import calibrate, central_event, check_delta, epsilon, finite_or_none
from mira.privacy.base import ClientMechanism, gaussian_like, register_mechanism


@register_mechanism
class DPFedAvg(ClientMechanism):
    mode = "central"

    @classmethod
    def check_strategy(cls, strategy_cls) -> None:
        if not getattr(strategy_cls, "dp_central", False):
            raise MiraError(f"central client-level DP needs a strategy whose server only uses the mean update "
                            f"(fedit, fedprox, ffa_lora, fedavgm, fedadam, fedyogi, fedadagrad); {strategy_cls.name} "
                            f"keeps individual updates: use privacy.client.mode: local", where="privacy.client.mode")

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        check_delta(self.delta, self.k, "clients", "privacy.client.delta")
        self.expected = self.q * self.k  # qK
        ad = cfg.adaptive
        self.count_std = 0.0
        self.z_update = self.z
        if ad is not None and self.z > 0:
            self.count_std = ad.count_stddev if ad.count_stddev is not None else self.expected / 20
            if self.z >= 2 * self.count_std:
                raise MiraError(f"adaptive clipping with noise multiplier {self.z:.3g} needs "
                                f"privacy.client.adaptive.count_stddev > {self.z / 2:.3g} (got {self.count_std:.3g}; "
                                f"the default is expected clients per round / 20)", where="privacy.client.adaptive.count_stddev")
            self.z_update = (self.z ** -2 - (2 * self.count_std) ** -2) ** -0.5

    def noise_multiplier(self) -> float:
        c = self.cfg
        if c.noise_multiplier is not None:
            return float(c.noise_multiplier)
        return calibrate(lambda z: central_event(z, self.q, self.rounds), c.epsilon, self.delta, "privacy.client.epsilon")

    def sample(self, rnd: int, k: int) -> list[int]:
        rng = np.random.default_rng(np.random.SeedSequence([self.noise_seed(), rnd, 2_000_003]))
        return [i for i in range(k) if rng.random() < self.q]

    def server_aggregate(self, rnd: int, results: dict, start: dict | None, keys: list[str]) -> tuple[dict, dict]:
        if start is None:
            raise MiraError("central DP needs one global adapter that every client starts from", where="privacy.client")
        clip = self.clip_norm
        total = {k: torch.zeros_like(start[k], dtype=torch.float64) for k in keys}
        unclipped, norms = 0, []
        for cid in sorted(results):
            delta, norm = self.clipped_delta(start, results[cid].adapter, keys, clip)
            norms.append(norm)
            unclipped += int(norm <= clip)
            self.participations[cid] += 1
            for k in keys:
                total[k] = total[k] + delta[k].to(total[k].device)
        gen = self.generator(rnd, 3_000_017)
        std = self.z_update * clip
        mean = {k: (total[k] + gaussian_like(total[k], std, gen)) / self.expected for k in keys}
        virtual = {k: (start[k].double() + mean[k]).to(start[k].dtype) for k in keys}
        info = {"dp_clip_norm": clip, "dp_noise_std": std / self.expected, "dp_clients": len(results)}
        if self.z == 0 and norms:  # the raw median norm is a noise-free statistic: only in a noiseless probe
            info["dp_update_norm_median"] = float(np.median(norms))
        ad = self.cfg.adaptive
        if ad is not None:  # bits shifted by -1/2 (sensitivity 1/2, which Thm 1's split assumes), then +1/2
            m = len(results)
            count_noise = float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_std
            noisy = (unclipped - m / 2 + count_noise) / self.expected + 0.5
            self.clip_norm = clip * math.exp(-ad.lr * (noisy - ad.target_quantile))
            info["dp_unclipped_fraction"] = noisy
        return {0: FitRes(virtual, 1, {})}, info

    def report(self) -> dict:
        eps = epsilon(central_event(self.z, self.q, self.rounds), self.delta) if self.z > 0 else math.inf
        return {"level": "client", "mode": self.mode, "accountant": "dp_accounting RDP",
                "epsilon": finite_or_none(eps), "delta": self.delta, "noise_multiplier": self.z,
                "noise_multiplier_update": self.z_update, "clip_norm": self.clip_norm,
                "clip_norm_initial": float(self.cfg.clip_norm), "adaptive": self.cfg.adaptive is not None,
                "sampling": "poisson", "sampling_rate": self.q, "rounds": self.rounds,
                "participations": list(self.participations)}
