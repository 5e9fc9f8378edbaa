"""The ``privacy:`` section of a run config (validated like the rest; see ``docs/privacy.md``).

``privacy.client`` is client-level DP on the uploads (what one client's whole dataset can change),
``privacy.sample`` is sample-level DP-SGD inside each client's local training (what one example
can change). Either is off when absent. Noise is set directly (``noise_multiplier``) or
calibrated by the accountant to a target ``epsilon`` at ``delta`` for the configured run."""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite(v):
    if v is not None and not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v}")
    return v


class AdaptiveClipping(_Strict):
    """Andrew et al. (2021): the clip norm follows the ``target_quantile`` of the update norms,
    ``C <- C * exp(-lr * (b - target_quantile))`` with ``b`` the noisy fraction of unclipped updates."""

    target_quantile: float = Field(0.5, ge=0, le=1)
    lr: float = Field(0.2, gt=0)
    count_stddev: Optional[float] = Field(None, ge=0)  # default: expected clients per round / 20

    _f = field_validator("lr", "count_stddev")(_finite)


class NoiseSpec(_Strict):
    noise_multiplier: Optional[float] = Field(None, ge=0)
    epsilon: Optional[float] = Field(None, gt=0)
    delta: Optional[float] = Field(None, gt=0, lt=1)  # default: 1 / n^1.1 (n clients or examples)

    _f = field_validator("noise_multiplier", "epsilon", "delta")(_finite)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.noise_multiplier is None) == (self.epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and epsilon")
        return self


class ClientDP(NoiseSpec):
    mode: Literal["central", "local"] = "central"
    clip_norm: float = Field(0.1, gt=0)  # C (the initial C with adaptive clipping)
    adaptive: Optional[AdaptiveClipping] = None

    _c = field_validator("clip_norm")(_finite)


class SampleDP(NoiseSpec):
    max_grad_norm: float = Field(1.0, gt=0)  # per-example gradient clip

    _c = field_validator("max_grad_norm")(_finite)


MODULUS_RANGE = 2**32  # Flower's SecAgg+ default: masks and the masked sums live modulo 2^32


class SecureAggregation(_Strict):
    """Secure aggregation with Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod``
    on the nodes): the server learns only the weighted sum of the uploads. Flower runtime only, and only
    for strategies whose server step needs just the mean (``mira.federated.flower.secagg``; docs/privacy.md).

    The knobs are Flower's, with its defaults (``num_shares``/``reconstruction_threshold`` have none in
    Flower; 3 and 2 are those of Flower's SecAgg+ example). An int is a count, a float a fraction (of the
    sampled clients for ``num_shares``, of ``num_shares`` for the threshold). Each uploaded value times
    its weight ``n_train / max_weight`` is clipped to ``[-clipping_range, clipping_range]`` and
    stochastically rounded to one of ``quantization_range`` levels. ``max_weight`` (Flower: 1000) is by
    default the largest client's training-set size here, so that the largest weight is 1 and the
    quantisation error of the mean is at most ``2 * clipping_range / quantization_range`` per value."""

    num_shares: Union[StrictInt, StrictFloat] = 3
    reconstruction_threshold: Union[StrictInt, StrictFloat] = 2
    clipping_range: float = Field(8.0, gt=0)
    quantization_range: StrictInt = Field(4194304, gt=0, lt=MODULUS_RANGE)  # 2^22
    max_weight: Optional[float] = Field(None, gt=0)  # None: the largest n_train among the clients

    _f = field_validator("clipping_range", "max_weight")(_finite)

    @model_validator(mode="after")
    def _flower_rules(self):
        # the checks of Flower's SecAggPlusWorkflow._check_init_params, up front and with the field named
        ns, t = self.num_shares, self.reconstruction_threshold
        if isinstance(ns, int) and ns != 1 and ns <= 2:
            raise ValueError(f"num_shares must be an integer > 2, 1 (all sampled clients) or a fraction > 0, got {ns}")
        if isinstance(ns, float) and not (math.isfinite(ns) and ns > 0):
            raise ValueError(f"num_shares as a fraction must be > 0, got {ns}")
        if isinstance(t, int) and t != 1 and (t < 1 or (isinstance(ns, int) and ns != 1 and t >= ns)):
            raise ValueError(f"reconstruction_threshold must be at least 1 and less than num_shares ({ns}), got {t}")
        if isinstance(t, float) and not 0 < t <= 1:
            raise ValueError(f"reconstruction_threshold as a fraction must be in (0, 1], got {t}")
        return self


class PrivacyConfig(_Strict):
    client: Optional[ClientDP] = None
    sample: Optional[SampleDP] = None
    # False: every noise draw is seeded from the run's seed (exact resume: a simulator's choice; anyone who
    # knows the config can subtract the noise). True: seeds from os.urandom, for a deployment.
    secure_noise: StrictBool = False
    # SecAgg+ on the Flower runtime (not differential privacy: ``enabled`` does not count it)
    secure_aggregation: Optional[SecureAggregation] = None

    @property
    def enabled(self) -> bool:
        return self.client is not None or self.sample is not None
