"""Run configuration: YAML validated by pydantic, with ``--set a.b=value`` overrides.

Strings may use environment variables (``${MIRA_ASSETS}/models/stories260K``); an
unset variable is an error that names the field. Any validation error becomes a
``MiraError`` naming the file and the field, so the CLI prints one line, exit code 2.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator, model_validator

from mira.errors import MiraError
from mira.privacy.config import PrivacyConfig
from mira.userfiles import dotted, first_non_finite, parse_yaml, pydantic_message, read_yaml


class _Strict(BaseModel):
    # strict: no silent coercion (``true`` is not 1, ``"3"`` is not 3, ``2.0`` is not an int; a YAML int is a
    # valid float); every float finite (``.inf``/``.nan`` are refused up front, not discovered in round 1)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    path: str = "builtin:demo"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps, ...
    quantization: Optional[Literal["4bit", "8bit"]] = None  # QLoRA through bitsandbytes; needs a CUDA GPU

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v


_DEVICE = re.compile(r"^(auto|cpu|meta|mps|(cuda|xpu|npu|hpu|xla)(:\d+)?)$")


class LoraSettings(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Optional[list[str]] = None
    # per-client ranks (heterogeneous LoRA; see docs/strategies.md): one per client, or fewer, cycled over
    # the clients (rank_by: client) or given to equal groups of clients by training-set size (rank_by: data_size)
    ranks: Optional[list[int]] = None
    rank_by: Literal["client", "data_size"] = "client"

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or any(r <= 0 for r in v)):
            raise ValueError(f"ranks must be a non-empty list of positive integers, got {v}")
        return v

    @model_validator(mode="after")
    def _rank_by(self):
        if self.rank_by != "client" and self.ranks is None:
            raise ValueError("rank_by needs lora.ranks (the ranks to give the groups of clients)")
        return self


class DataConfig(_Strict):
    source: str = "synthetic"
    path: Optional[str] = None
    split: str = "train"
    tasks: Optional[list[str]] = None
    max_per_task: Optional[int] = Field(200, gt=0)
    max_length: int = Field(256, gt=8)
    template: str = "auto"
    overflow: Literal["drop", "truncate_input"] = "drop"
    min_response_tokens: int = Field(16, gt=0)
    field_map: dict[str, str] = Field(default_factory=dict)
    seed: int = 0


class PartitionConfig(_Strict):
    name: str = "by_task"
    clients_per_task: int = Field(1, gt=0)
    num_clients: Optional[int] = Field(None, gt=0)
    alpha: float = Field(0.5, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    test_size: Optional[int] = Field(None, gt=0)
    # a validation split carved from each client's *training* data (0: none); for model selection
    # (``mira tune``), never the test split
    val_fraction: float = Field(0.0, ge=0, lt=1)


class FederationConfig(_Strict):
    rounds: int = Field(10, gt=0)
    fraction: float = 1.0
    local_steps: Optional[int] = Field(10, gt=0)
    local_epochs: Optional[float] = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = 3e-4
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    min_clients: int = Field(1, gt=0)

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"learning rate must be positive, got {v}")
        return v


class AlgorithmConfig(BaseModel):
    """``name`` picks the strategy class; the other keys are that strategy's ``Params``."""

    model_config = ConfigDict(extra="allow")
    name: StrictStr = "mira"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvalConfig(_Strict):
    every: int = Field(1, gt=0)
    # the global loss (every client's adapter on the union of all test splits) costs K adapters x all
    # test examples for personalised strategies: "final" computes it at the last evaluation only,
    # "never" not at all (``global_loss``/``mean_global_test_loss`` are then null)
    global_loss: Literal["every", "final", "never"] = "every"
    batch_size: int = Field(16, gt=0)
    # ROUGE-L / exact match of greedy generations on each client's first max_examples test examples:
    # true at every evaluation, "final" at the last one only (generation is the slow part of an evaluation)
    generation: Union[bool, Literal["final"]] = False
    max_new_tokens: int = Field(32, gt=0)
    max_examples: int = Field(8, gt=0)


class TrainConfig(_Strict):
    """How each local update runs (memory/speed trade-offs, not the algorithm)."""

    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower


class RefineHook(BaseModel):
    """Optional per-client data refinement before training (see ``mira.shed``)."""

    model_config = ConfigDict(extra="allow")
    method: StrictStr = "shed"


class RunConfig(_Strict):
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    refine: Optional[RefineHook] = None
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    plots: bool = True

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.federation.local_epochs is not None:
            self.federation.local_steps = None
        return self


DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise MiraError(f"environment variable {name} is not set (used in {value!r}); "
                            f"e.g. export {name}=../shared", where=where)
        return _ENV.sub(sub, value)
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise MiraError(f"--set expects key=value, got {item!r}", where="--set")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MiraError(f"cannot set {key}: {p} is not a section", where="--set")
        node[parts[-1]] = _parse_scalar(value)
    return raw


def validate(raw: dict, source: str = "config") -> RunConfig:
    """``raw`` as a checked ``RunConfig``; every problem a ``MiraError`` naming ``source`` (the file,
    or the flag the values came from) and the field."""
    try:
        raw = _expand(raw, "")
        try:
            cfg = RunConfig.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(root)"
            raise MiraError(f"{field}: {pydantic_message(err)}") from None
        bad = first_non_finite(cfg)  # sections defined elsewhere (e.g. privacy) too
        if bad is not None:
            raise MiraError(f"{dotted(bad[0])}: must be a finite number, got {bad[1]}")
        _check_names(cfg)
    except MiraError as e:
        if source == "config":
            raise
        raise MiraError(e.message, where=f"{source}: {e.where}" if e.where else source) from None
    return cfg



def _check_names(cfg: RunConfig) -> None:
    """Registered names and algorithm options are checked before anything is loaded."""
    from mira.data.partition import PARTITIONERS
    from mira.data.records import SOURCES
    from mira.federated.strategies import get_strategy

    strategy = get_strategy(cfg.algorithm.name)
    params = strategy.parse_params(cfg.algorithm.params())
    if cfg.lora.ranks is not None and not strategy.supports_ranks(params):
        raise MiraError(f"{cfg.algorithm.name} trains one rank for all clients; per-client ranks need flora, hetlora "
                        "or mira with space: delta", where="lora.ranks")
    if cfg.partition.name not in PARTITIONERS:
        raise MiraError(f"unknown partitioner {cfg.partition.name!r}; choose one of {sorted(PARTITIONERS)}",
                        where="partition.name")
    if cfg.data.template not in ("auto", "chat"):
        from mira.data.prompts import get_template

        get_template(cfg.data.template, None)
    if cfg.data.source not in SOURCES:
        raise MiraError(f"unknown data source {cfg.data.source!r}; choose one of {sorted(SOURCES)}", where="data.source")


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> tuple[RunConfig, dict]:
    """Read a YAML config (or the embedded default when ``path`` is None)."""
    raw: dict = {}
    source = "config"
    if path is None:
        raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
        source = "embedded default config"
    else:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise MiraError(f"config file not found: {p}")
        raw = read_yaml(p, "config file")
        if raw is None:
            raw = {}
            logging.getLogger("mira").warning("%s is empty: every field takes its default value", p)
        if not isinstance(raw, dict):
            raise MiraError("a config must be a YAML mapping", where=str(p))
    raw = apply_overrides(raw, list(overrides))
    return validate(raw, source), raw


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
