"""The merge recipe: a YAML (or dict) file close to mergekit's format, validated with pydantic.

.. code-block:: yaml

    merge_method: ties
    base_model: runs/base
    models:
      - model: runs/math
        parameters: {weight: 1.0, density: 0.5}
      - model: runs/code
        parameters: {weight: 0.5, density: 0.3}
    dtype: bfloat16
    parameters: {lambda: 1.0}

Paths are used as written (relative paths are relative to the working directory, as in
mergekit). Every mistake becomes a one-line ``MiraError`` naming the file and the field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mira.errors import MiraError
from mira.userfiles import read_yaml

Dtype = Literal["float32", "float16", "bfloat16"]
# no silent coercion (``true`` is not a weight, ``"0.5"`` is not a density; an int is a valid float), and
# every number finite: a ``nan`` weight would write a model of nans
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _check_density(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {value}")
    return value


class ModelParameters(BaseModel):
    """Per-model parameters."""

    model_config = _STRICT

    weight: float = 1.0
    """Weight of the model in the merge (not used by slerp)."""
    density: float | None = None
    """Fraction of the task vector kept: by magnitude (ties) or at random (dare)."""

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: float | None) -> float | None:
        return _check_density(value)


class ModelEntry(BaseModel):
    """One input: a model or adapter folder and its parameters."""

    model_config = _STRICT

    model: str
    parameters: ModelParameters = Field(default_factory=ModelParameters)

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, data: Any) -> Any:
        """Accept ``- path/to/model`` as ``- model: path/to/model``."""
        return {"model": data} if isinstance(data, (str, os.PathLike)) else data

    @field_validator("model", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value


class MergeParameters(BaseModel):
    """Global parameters; each method reads the ones it needs (see ``mira.merge.methods``)."""

    model_config = ConfigDict(**_STRICT, populate_by_name=True)

    lambda_: float = Field(1.0, alias="lambda")
    """Scale of the merged task vector (task_arithmetic, ties, dare)."""
    t: float = Field(0.5, ge=0.0, le=1.0)
    """slerp: 0 gives the first model (``base_model`` when set, as in mergekit), 1 the other."""
    density: float | None = None
    """Default per-model density (ties, dare)."""
    drop_rate: float | None = Field(None, ge=0.0, lt=1.0, validation_alias=AliasChoices("drop_rate", "p"))
    """dare: probability of dropping an entry; the same as ``density: 1 - drop_rate``."""
    combine: Literal["linear", "ties"] = "linear"
    """dare: combine the sparsified task vectors by task arithmetic or by TIES sign election."""
    normalize: bool | None = None
    """Divide by the sum of the weights (default, as mergekit's: yes for linear and ties, no otherwise)."""
    rescale: Literal["l1", "inverse_density", "none"] | None = None
    """dare, ties: rescale the kept entries to the task vector's L1 norm (``l1``, dare's default), by
    ``1 / density`` (``inverse_density``) or not (``none``, ties' default). mergekit's ``true`` / ``false``
    mean ``l1`` / ``none``."""
    int8_mask: bool | None = None
    """Accepted so that mergekit recipes load; it only changes mergekit's mask dtype and has no effect here."""
    weights: list[float] | None = None
    """Weights of the models, in order; an alternative to ``models[i].parameters.weight``."""
    seed: int = 0
    """dare: seed of the random drops."""
    space: Literal["factors", "delta"] = "delta"
    """LoRA only: merge the A and B factors separately, or the products ``scaling * B @ A``."""
    rank: int | None = Field(None, ge=1)
    """LoRA, ``space: delta``: rank of the output adapter (default: the largest input rank)."""
    output: Literal["adapter", "model"] = "adapter"
    """LoRA only: write a PEFT adapter, or fold the merged delta into ``base_model`` and write a full model."""

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: float | None) -> float | None:
        return _check_density(value)

    @field_validator("rescale", mode="before")
    @classmethod
    def _mergekit_rescale(cls, value: Any) -> Any:
        """mergekit's boolean ``rescale``: true is its L1-norm rescaling, false none."""
        if isinstance(value, bool):
            return "l1" if value else "none"
        return value

    @model_validator(mode="after")
    def _one_way_to_set_density(self) -> MergeParameters:
        if self.density is not None and self.drop_rate is not None:
            raise ValueError("set either density or drop_rate (drop_rate = 1 - density), not both")
        return self


class MergeRecipe(BaseModel):
    """A whole merge: method, inputs, optional base, output dtype and global parameters."""

    model_config = _STRICT

    merge_method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = None
    dtype: Dtype | None = None
    """Output dtype (default: that of the first model's tensors). Arithmetic is float32."""
    parameters: MergeParameters = Field(default_factory=MergeParameters)

    @field_validator("base_model", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _weights_match_models(self) -> MergeRecipe:
        weights = self.parameters.weights
        if weights is None:
            return self
        if len(weights) != len(self.models):
            raise ValueError(f"parameters.weights has {len(weights)} values for {len(self.models)} models")
        if any("weight" in m.parameters.model_fields_set for m in self.models):
            raise ValueError("weights are given both in parameters.weights and in models[*].parameters.weight")
        return self

    # -- resolved values ------------------------------------------------------------------
    def weights(self) -> list[float]:
        """One weight per model."""
        if self.parameters.weights is not None:
            return list(self.parameters.weights)
        return [m.parameters.weight for m in self.models]

    def densities(self, use_drop_rate: bool = True) -> tuple[float, ...] | None:
        """One density per model, or ``None`` when no density (or drop rate, if used) is set anywhere."""
        p = self.parameters
        default = 1.0 - p.drop_rate if use_drop_rate and p.drop_rate is not None else p.density
        per_model = [m.parameters.density for m in self.models]
        if default is None and all(d is None for d in per_model):
            return None
        return tuple(d if d is not None else (default if default is not None else 1.0) for d in per_model)

    def set_fields(self) -> set[str]:
        """Global parameter names (as written in YAML) that the recipe sets."""
        names = set()
        for field in self.parameters.model_fields_set:
            names.add("lambda" if field == "lambda_" else field)
        return names


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(err: ValidationError, where: str | None) -> MiraError:
    first = err.errors()[0]
    from mira.userfiles import pydantic_message

    message = pydantic_message(first)
    loc = _format_loc(first["loc"])
    more = len(err.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    location = ": ".join(x for x in (where, loc) if x)
    return MiraError(message, where=location or None)


def load_recipe(source: MergeRecipe | Mapping[str, Any] | str | os.PathLike) -> MergeRecipe:
    """A validated ``MergeRecipe`` from a recipe object, a dict, or a YAML file path."""
    if isinstance(source, MergeRecipe):
        return source
    where = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise MiraError("recipe file not found", where=where)
        data = read_yaml(path, "recipe file")
    else:
        data = source
    if not isinstance(data, Mapping):
        raise MiraError("a recipe must be a mapping with merge_method and models", where=where)
    try:
        return MergeRecipe.model_validate(dict(data))
    except ValidationError as e:
        raise _validation_error(e, where) from None
