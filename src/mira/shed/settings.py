"""SHED settings: one validated pydantic model shared by the CLI, the API and the ``refine:`` hook.

Paper defaults (He et al., NeurIPS 2024) where they exist: k=10 Monte-Carlo iterations,
groups of 60 proxies removed at a time out of 3000 clusters for ~100k records. Because
mira runs on data sets of any size, the cluster count and group size default to the
same *ratios* (``clusters ~ n/33``, ``group_size ~ clusters/50``), which gives the paper's
numbers at the paper's scale.

``budget`` is a fraction of the candidate records when it is a float in (0, 1] and a
record count when it is an integer (``0.1`` = 10 %, ``200`` = 200 records, ``1.0`` = all).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mira.errors import MiraError

RECORDS_PER_CLUSTER = 33  # paper: 3000 clusters for ~100k records
GROUPS_PER_ITERATION = 50  # paper: 3000 proxies removed 60 at a time


class ShedSettings(BaseModel):
    """Every knob of a SHED refinement (all optional; see the module docstring for defaults)."""

    model_config = ConfigDict(extra="forbid")

    # selection
    budget: Union[int, float] = 0.1
    strategy: str = "qocs"
    beta: float = 1.0
    standardize: bool = False  # QWCS on z-scored values: beta in units of standard deviations
    # clustering
    clusters: Optional[int] = Field(None, gt=0)
    embedder: str = "all-MiniLM-L6-v2"
    embed_max_length: Optional[int] = Field(None, gt=0)
    embed_batch_size: int = Field(64, gt=0)
    # Monte-Carlo Shapley
    iterations: int = Field(10, gt=0)
    group_size: Optional[int] = Field(None, gt=0)
    credit: Literal["group", "split"] = "group"
    tolerance: float = Field(0.01, ge=0)
    # value function v(S): a short LoRA fine-tune of the proxy model, scored on validation data
    model: str = "builtin:demo"
    device: str = "auto"
    metric: Literal["neg_loss", "token_accuracy"] = "neg_loss"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_val: int = Field(200, gt=0)
    steps: int = Field(20, gt=0)
    epochs: Optional[float] = Field(None, gt=0)  # if set: ceil(epochs*|S|/batch_size) steps per v(S), as the paper
    warm_start_steps: int = Field(0, ge=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(128, gt=8)
    template: str = "auto"  # see mira.data.prompts; long inputs are cut from the middle, never the instruction
    lora_r: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Optional[list[str]] = None
    eval_batch_size: int = Field(16, gt=0)
    seed: int = 0

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a fraction in (0, 1] or a record count, got {v!r}")
        if isinstance(v, float):
            if not (0 < v <= 1) or math.isnan(v):
                raise ValueError(f"a fractional budget must be in (0, 1], got {v} (write a record count as an integer)")
        elif v < 1:
            raise ValueError(f"must be a fraction in (0, 1] or a record count >= 1, got {v}")
        return v

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from mira.shed.select import SELECTORS

        if v not in SELECTORS:
            raise ValueError(f"unknown strategy {v!r}; choose one of {sorted(SELECTORS)}")
        return v

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v

    # -- derived sizes -------------------------------------------------------------------
    def budget_count(self, n_candidates: int, held_out: int = 0) -> int:
        """The number of records to keep out of ``n_candidates``; ``MiraError`` if impossible."""
        if isinstance(self.budget, float):
            return max(1, min(n_candidates, round(self.budget * n_candidates)))
        if self.budget > n_candidates:
            note = f" ({held_out} more are held out for validation)" if held_out else ""
            raise MiraError(f"budget {self.budget} is larger than the {n_candidates} candidate records{note}")
        return int(self.budget)

    def cluster_count(self, n_candidates: int) -> int:
        """``clusters`` or, when unset, about one cluster per 33 records (paper: 3000 for ~100k)."""
        if self.clusters is None:
            return max(1, min(n_candidates, math.ceil(n_candidates / RECORDS_PER_CLUSTER)))
        if self.clusters > n_candidates:
            raise MiraError(f"more clusters ({self.clusters}) than candidate records ({n_candidates})")
        return self.clusters

    def group_count(self, n_proxies: int) -> int:
        """``group_size`` or, when unset, about 1/50 of the proxies (paper: 60 of 3000)."""
        if self.group_size is None:
            return max(1, round(n_proxies / GROUPS_PER_ITERATION))
        return self.group_size

    @classmethod
    def from_mapping(cls, raw: dict, where: str = "shed", flags: bool = False) -> "ShedSettings":
        """Validate a plain mapping; any problem becomes a one-line ``MiraError`` naming the field
        (as ``<where>.<field>``, or as a command-line flag ``--<field>`` when ``flags``)."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("int", "float"))) or "(root)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown option (known: {', '.join(sorted(cls.model_fields))})"
            if flags:
                raise MiraError(msg, where="--" + field.replace("_", "-")) from None
            raise MiraError(msg, where=f"{where}.{field}" if where else field) from None
