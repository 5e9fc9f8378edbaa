"""SHED settings: one validated pydantic model shared by the CLI, the API and the ``refine:`` hook.

Paper defaults (He et al., NeurIPS 2024) where they fit a CPU: k = 10 Monte-Carlo
iterations, about one cluster per 33 records (3000 clusters for ~100k records; at least 10). The paper
removes 60 of 3000 proxies at a time (50 groups per permutation, ~500 v(S) in all); here the
group size defaults to a tenth of the proxies (10 groups per permutation, ~100 v(S)), so a
first run takes minutes whatever the data size. ``group_size`` sets it explicitly.

The budget is explicit about its unit: ``budget_fraction`` (a share of the candidate
records, in (0, 1]) or ``budget_records`` (a count); neither given means 10 %. The old
``budget`` (``1`` one record, ``1.0`` every record) is refused with a pointer to the two.

v(S) trains a fixed ``steps`` of SGD (``optimizer``; lr 0.1 unless ``lr`` is set) on batches
drawn from S, whatever |S| (see ``mira.shed.value``);
``epochs`` (``ceil(epochs*|S|/batch)`` steps) is refused: it made a proxy's value measure the
training steps its removal took away.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mira.errors import MiraError
from mira.userfiles import pydantic_message

RECORDS_PER_CLUSTER = 33  # paper: 3000 clusters for ~100k records
MIN_CLUSTERS = 10  # fewer clusters than this leave too few players to rank
GROUPS_PER_ITERATION = 10  # paper: 50 (3000 proxies removed 60 at a time); 10 keeps a CPU run to minutes
DEFAULT_BUDGET_FRACTION = 0.1
DEFAULT_LR = {"sgd": 0.1, "adamw": 3e-3}

OLD_BUDGET = ("'budget' is ambiguous (1 meant one record, 1.0 every record) and was removed: "
              "give budget_fraction (e.g. 0.1) or budget_records (e.g. 500)")
OLD_EPOCHS = ("'epochs' was removed: ceil(epochs*|S|/batch) steps per v(S) made a proxy's value measure the "
              "training steps its removal took away; v(S) now trains a fixed 'steps' on batches drawn from S")


class ShedSettings(BaseModel):
    """Every knob of a SHED refinement (all optional; see the module docstring for defaults)."""

    # as the run config: no silent coercion, every float finite
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # selection
    budget_fraction: Optional[float] = Field(None, gt=0, le=1)
    budget_records: Optional[int] = Field(None, ge=1)
    budget: Optional[Any] = None  # removed (see OLD_BUDGET); kept only to refuse it clearly
    strategy: str = "qocs"
    beta: float = 1.0
    standardize: bool = False  # QWCS on z-scored values: beta in units of standard deviations
    # clustering
    clusters: Optional[int] = Field(None, gt=0)
    embedder: str = "all-MiniLM-L6-v2"
    embed_fields: Literal["split", "example"] = "split"  # prompt and response embedded apart, or the whole example
    embed_max_length: Optional[int] = Field(128, gt=0)  # word pieces per text (MiniLM was trained on 128)
    embed_batch_size: int = Field(64, gt=0)
    # Monte-Carlo Shapley
    iterations: int = Field(10, gt=0)
    group_size: Optional[int] = Field(None, gt=0)
    credit: Literal["group", "split"] = "group"
    antithetic: bool = True  # permutations in pairs: a group order and its reverse
    center: bool = True  # position control variate: each credit minus the mean credit at its position
    # truncation: stop a permutation once |v(S) - v(N)| < tolerance * |v(N) - v(empty)|; None = the
    # measured noise of one v(S) (the marginals left are below what one v(S) can resolve)
    tolerance: Optional[float] = Field(None, ge=0, lt=1)
    # training seed of v(S): "fixed" = one seed (one set of batch priorities) for every permutation; "per_unit"
    # = each permutation (antithetic pair) trains with its own seed, marginals within it still paired
    train_seeds: Literal["fixed", "per_unit"] = "fixed"
    noise_seeds: int = Field(2, ge=0)  # extra training seeds of v(all proxies), to measure the noise of one v(S)
    reliability_threshold: float = Field(0.5, ge=-1, le=1)  # split-half rank correlation below this: noise
    # value function v(S): LoRA fine-tune of the proxy model for a fixed number of steps, scored on validation data
    model: str = "builtin:demo"
    device: str = "auto"
    metric: Literal["neg_loss", "token_accuracy"] = "neg_loss"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_val: int = Field(200, gt=0)
    steps: int = Field(10, gt=0)
    epochs: Optional[Any] = None  # removed (see OLD_EPOCHS); kept only to refuse it clearly
    background: int = Field(24, ge=0)  # non-proxy records every v(S) also trains on (see mira.shed.value)
    # records per cluster that v(S) trains on: its proxy and the next nearest members (1 = the paper's one proxy);
    # a cluster's value then averages over its members instead of resting on one record
    proxy_size: int = Field(1, gt=0)
    warm_start_steps: int = Field(0, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # of the v(S) fine-tunes (SGD: marginals far less chaotic)
    # the training loss of v(S): "token" = mean over every response token of the batch (a record weighs as
    # many tokens as it has); "record" = mean of each record's own mean token loss (every record weighs the same)
    loss_weighting: Literal["token", "record"] = "token"
    lr: Optional[float] = Field(None, gt=0)  # default: DEFAULT_LR[optimizer]
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
        if v is not None:
            raise ValueError(OLD_BUDGET)
        return v

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError(OLD_EPOCHS)
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

    @model_validator(mode="after")
    def _one_budget(self):
        if self.budget_fraction is not None and self.budget_records is not None:
            raise ValueError("give budget_fraction or budget_records, not both")
        return self

    @property
    def value_lr(self) -> float:
        """The learning rate of the v(S) fine-tunes: ``lr``, or the optimizer's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def warm_lr(self) -> float:
        """The AdamW rate of the warm start: ``lr`` when v(S) trains with AdamW too, else AdamW's default
        (an SGD rate such as 0.1 would make AdamW's first steps move every weight by 0.1)."""
        return self.value_lr if self.optimizer == "adamw" else DEFAULT_LR["adamw"]

    # -- derived sizes -------------------------------------------------------------------
    def budget_count(self, n_candidates: int, held_out: int = 0) -> int:
        """The number of records to keep out of ``n_candidates``; ``MiraError`` if impossible."""
        if self.budget_records is not None:
            if self.budget_records > n_candidates:
                note = f" ({held_out} more are held out for validation)" if held_out else ""
                raise MiraError(f"budget {self.budget_records} records is larger than the {n_candidates} "
                                f"candidate records{note}", where="budget_records")
            return int(self.budget_records)
        fraction = DEFAULT_BUDGET_FRACTION if self.budget_fraction is None else self.budget_fraction
        return max(1, min(n_candidates, round(fraction * n_candidates)))

    def cluster_count(self, n_candidates: int) -> int:
        """``clusters`` or, when unset, about one cluster per 33 records (paper: 3000 for ~100k), and at
        least ``MIN_CLUSTERS`` (every record its own cluster below that)."""
        if self.clusters is None:
            return max(1, min(n_candidates, max(MIN_CLUSTERS, math.ceil(n_candidates / RECORDS_PER_CLUSTER))))
        if self.clusters > n_candidates:
            raise MiraError(f"more clusters ({self.clusters}) than candidate records ({n_candidates})",
                            where="clusters")
        return self.clusters

    def group_count(self, n_proxies: int) -> int:
        """``group_size`` or, when unset, a tenth of the proxies rounded up (10 groups per permutation)."""
        if self.group_size is None:
            return max(1, math.ceil(n_proxies / GROUPS_PER_ITERATION))
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
            msg = pydantic_message(err)
            if err["type"] == "extra_forbidden":
                msg = f"unknown option (known: {', '.join(sorted(set(cls.model_fields) - {'budget', 'epochs'}))})"
            if field == "(root)" and "budget_fraction or budget_records" in msg:
                field = "budget_fraction"
            if flags:
                raise MiraError(msg, where="--" + field.replace("_", "-")) from None
            raise MiraError(msg, where=f"{where}.{field}" if where else field) from None
