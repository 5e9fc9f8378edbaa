"""The strategy interface, modelled on Flower's: a small class with a handful of methods.

A strategy is pure server logic on adapter tensors; it never sees the model or data,
so the in-process engine and the Flower app run the same classes.

* ``configure_fit(cid)`` -> ``FitIns``: what client ``cid`` starts from and how it trains.
* ``aggregate_fit(rnd, results)``: fold the uploaded adapters into the server state.
* ``adapter_for(cid)``: the adapter client ``cid`` would use (for evaluation and export).
* ``state_dict()`` / ``load_state_dict()``: everything needed to resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from mira.errors import MiraError
from mira.models.adapters import AdapterState

STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(cls):
    STRATEGIES[cls.name] = cls
    return cls


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StrategyContext:
    """What a strategy may know about the federation (never the data itself)."""

    num_clients: int
    n_train: list[int]
    lr: float
    local_steps: int  # R (for epochs: the mean number of steps per client)
    seed: int
    keys: list[str]  # adapter keys in order
    rounds: int = 1  # the configured rounds T (the training budget is T x R local steps)
    # per-client LoRA ranks (``lora.ranks``; None: every client has the slot's rank) and, once the
    # engine has the model, each of those ranks' initial adapter; PEFT's scale is ``lora_alpha / r``
    ranks: list[int] | None = None
    inits: dict[int, AdapterState] = field(default_factory=dict)
    lora_alpha: float = 16.0


@dataclass
class FitIns:
    adapter: AdapterState
    frozen: frozenset[str] = frozenset()
    prox_mu: float = 0.0
    step_scale: int = 1  # local steps = step_scale x R (one-shot trains the whole budget at once)


@dataclass
class FitRes:
    adapter: AdapterState
    n_train: int
    metrics: dict = field(default_factory=dict)


class Strategy:
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    personalized: ClassVar[bool] = False  # each client evaluates its own adapter
    exchanges: ClassVar[bool] = True  # False: nothing is sent (local training)
    pooled: ClassVar[bool] = False  # True: one adapter on the pooled data (centralized)
    # False: the rounds or steps depend on federation.rounds (ctx.rounds), so a resume may not change it
    rounds_extendable: ClassVar[bool] = True
    # True: every sampled client trains R local steps in every round (DP-SGD's calibration assumes it)
    uniform_steps: ClassVar[bool] = True
    heterogeneous_ranks: ClassVar[bool] = False  # True: accepts per-client LoRA ranks (``lora.ranks``)
    # True: the server step uses the uploads only through their mean, so central client-level DP
    # (``mira.privacy.dp_fedavg``) can hand it one private mean instead
    dp_central: ClassVar[bool] = False

    def __init__(self, params: BaseModel, ctx: StrategyContext, init: AdapterState):
        self.p = params
        self.ctx = ctx
        self.init = {k: v.clone() for k, v in init.items()}

    @classmethod
    def parse_params(cls, raw: dict) -> BaseModel:
        """``Params`` from the config's ``algorithm`` options: strict types (``true`` is not a number,
        ``"0.1"`` is not a float; an int is a valid float) and finite floats, as in the rest of the config."""
        from mira.userfiles import pydantic_message
        from mira.userfiles import dotted, first_non_finite

        try:
            params = cls.Params.model_validate(raw, strict=True)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown option for this algorithm" if err["type"] == "extra_forbidden" else pydantic_message(err)
            raise MiraError(f"{msg}", where=f"algorithm.{loc} ({cls.name})") from None
        bad = first_non_finite(params)
        if bad is not None:
            raise MiraError(f"must be a finite number, got {bad[1]}", where=f"algorithm.{dotted(bad[0])} ({cls.name})")
        return params

    @classmethod
    def check_setup(cls, params: BaseModel, ctx: StrategyContext) -> None:
        """Refuse, with a ``MiraError``, options that cannot work for this federation (e.g. MIRA's
        overshooting step). Needs no adapter, so ``mira compare`` and ``mira tune`` call it for
        every algorithm and seed before the first run starts; the constructor calls it too."""

    @classmethod
    def supports_ranks(cls, params: BaseModel) -> bool:
        """Whether clients of different LoRA ranks can take part (``mira`` only with ``space: delta``)."""
        return cls.heterogeneous_ranks

    def num_rounds(self, rounds: int) -> int:
        """Communication rounds for a budget of ``rounds`` x R local steps."""
        return rounds

    def select_clients(self, rnd: int, sampled: list[int]) -> list[int]:
        """The clients that train in round ``rnd``, given the engine's uniform sample
        (which is drawn first either way, so the random streams do not depend on this)."""
        return sampled

    # -- what travels ---------------------------------------------------------------
    def wire_keys(self) -> list[str]:
        """Adapter keys that are sent down and up (all of them unless a strategy freezes some)."""
        return list(self.ctx.keys)

    # -- the four methods ------------------------------------------------------------
    def configure_fit(self, cid: int) -> FitIns:
        raise NotImplementedError

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        raise NotImplementedError

    def adapter_for(self, cid: int) -> AdapterState:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise MiraError(f"unknown algorithm {name!r}; choose one of {sorted(STRATEGIES)}", where="algorithm.name")
    return STRATEGIES[name]


def data_size_weights(n_train: list[int]) -> list[float]:
    """The clients' shares of the data, ``n_i / sum_j n_j`` (equal shares when no client reports data)."""
    total = float(sum(n_train))
    if total <= 0:
        return [1.0 / len(n_train)] * len(n_train)
    return [n / total for n in n_train]


def weighted_average(states: list[AdapterState], weights: list[float], keys: list[str]) -> AdapterState:
    total = float(sum(weights))
    return {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in keys}
