"""Running a merge: check the inputs, plan the output tensors, then stream them to disk.

``merge(recipe, out_dir)`` works in three steps:

1. **Check** (headers only, nothing read or written): every folder exists and is the same
   kind (full models or LoRA adapters), same architecture, same tensor names and shapes;
   the method gets the number of models and the base it needs.
2. **Plan**: the list of output tensors (name, shape, dtype), each with a function that
   produces it. The plan depends on the inputs: full models; adapters merged in ``factors``
   space; adapters merged in ``delta`` space and re-factored; or adapters folded into the
   base model (``output: model``).
3. **Stream**: for each planned tensor, hand the method the same-named tensor of every
   input as a ``LazyTensors`` (read from disk when the method iterates over it) plus the
   base's, and append the result to the output shards as soon as it is computed. At any
   moment the merger holds the base's tensor, one or two inputs' and a few temporaries of
   one name: memory is a small multiple of the largest tensor, whatever the size or
   number of the models.

The output is written to a temporary folder next to ``out_dir`` and renamed into place at
the end, so a failed merge leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
import yaml
from torch import Tensor

from mira.errors import MiraError
from mira.io import is_empty_dir, make_temp_dir, recover_dir, replace_dir
from mira.merge import lora
from mira.merge.checkpoint import ADAPTER_CONFIG, MODEL_CONFIG, Checkpoint, ShardedWriter, TensorSpec, copy_side_files
from mira.merge.recipe import MergeRecipe, load_recipe
from mira.merge.registry import LazyTensors, MergeMethod, MergeParams, get_method, weighted_sum
from mira.userfiles import check_out_folder

logger = logging.getLogger(__name__)

DEFAULT_SHARD_MB = 1024.0
"""Output shards hold at most this many MB (mebibytes) of tensor data."""
RECIPE_COPY = "merge_recipe.yaml"
"""The recipe is saved next to the merged weights under this name."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LORA_ONLY_PARAMETERS = {"space", "rank", "output"}
_ALWAYS_ALLOWED = {"weights", "int8_mask"}  # int8_mask: accepted from mergekit recipes, no effect

Progress = Callable[[int, int, str], None]
"""``progress(done, total, tensor_name)``, called after each output tensor is written."""


@dataclass
class MergeResult:
    """What a merge wrote."""

    out_dir: Path
    kind: Literal["model", "adapter"]
    method: str
    num_models: int
    num_tensors: int
    num_bytes: int
    files: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Planned:
    spec: TensorSpec
    produce: Callable[[], Tensor]


def merge(recipe: MergeRecipe | Mapping[str, Any] | str | os.PathLike, out_dir: str | os.PathLike, *,
          overwrite: bool = False, max_shard_mb: float | None = DEFAULT_SHARD_MB,
          progress: Progress | None = None) -> MergeResult:
    """Merge the models or adapters of ``recipe`` into ``out_dir``.

    ``recipe`` is a ``MergeRecipe``, a dict in the recipe format, or a YAML file path.
    ``out_dir`` must not exist or be empty unless ``overwrite``. Full-model outputs are
    split into shards of at most ``max_shard_mb`` MB (``None``: one file). Raises
    ``MiraError`` for any problem with the recipe or the inputs, before writing anything.
    """
    started = time.perf_counter()
    job = _Job(load_recipe(recipe))
    out = Path(out_dir)
    recover_dir(out)  # a swap a kill interrupted: put the old folder back before judging it
    _check_output_folder(out, job, overwrite)
    plan, stem, template = job.plan()

    tmp = make_temp_dir(out)  # beside out, umask permissions
    try:
        max_bytes = None if max_shard_mb is None or stem != "model" else int(max_shard_mb * 2**20)
        writer = ShardedWriter(tmp, [p.spec for p in plan], stem=stem, max_shard_bytes=max_bytes)
        for done, item in enumerate(plan, start=1):
            writer.write(item.spec.name, item.produce())
            if progress is not None:
                progress(done, len(plan), item.spec.name)
        files = writer.close()
        copy_side_files(template, tmp)
        job.write_configs(tmp)
        (tmp / RECIPE_COPY).write_text(yaml.safe_dump(
            job.recipe.model_dump(mode="json", by_alias=True, exclude_unset=True), sort_keys=False))
        replace_dir(tmp, out)  # old or new always exists, even after a kill mid-swap
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(out_dir=out, kind=job.output_kind, method=job.method.name, num_models=len(job.models),
                       num_tensors=len(plan), num_bytes=sum(p.spec.nbytes for p in plan), files=files,
                       seconds=time.perf_counter() - started, warnings=job.warnings)


def _check_output_folder(out: Path, job: _Job, overwrite: bool) -> None:
    check_out_folder(out)  # a file is never replaced by a merge, even with --overwrite
    inputs = [Path(e.model) for e in job.recipe.models] + [m.path for m in job.models]
    inputs += [Path(job.recipe.base_model)] if job.recipe.base_model else []
    inputs += [job.base.path] if job.base else []
    if any(out.resolve() == p.resolve() for p in inputs):
        raise MiraError("the output folder is one of the inputs", where=str(out))
    if not overwrite and not is_empty_dir(out):
        raise MiraError("output folder exists and is not empty (use --overwrite to replace it)", where=str(out))


class _Job:
    """One checked merge: the recipe, its method, the opened inputs and the resolved parameters."""

    def __init__(self, recipe: MergeRecipe):
        self.recipe = recipe
        self.method: MergeMethod = get_method(recipe.merge_method)
        self.warnings: list[str] = []
        self.models = [Checkpoint.open(e.model, where=f"models[{i}].model") for i, e in enumerate(recipe.models)]
        self.kind = self.models[0].kind
        for model in self.models[1:]:
            if model.kind != self.kind:
                raise MiraError(f"{model.path} is a {_describe(model.kind)} but models[0] is a "
                                f"{_describe(self.kind)}; merge one kind at a time", where=model.where)
        self.weights = recipe.weights()
        self.params = MergeParams(lam=recipe.parameters.lambda_, t=recipe.parameters.t,
                                  densities=recipe.densities(use_drop_rate="drop_rate" in self.method.parameters),
                                  normalize=recipe.parameters.normalize, rescale=recipe.parameters.rescale,
                                  combine=recipe.parameters.combine, seed=recipe.parameters.seed)
        self.dtype = DTYPES[recipe.dtype] if recipe.dtype else None
        self._ranks: dict[str, int] = {}  # output rank per LoRA module, set when planning an adapter
        self._place_base_model()
        self._check_method()
        self.base = self._open_base()
        self._check_compatible()
        self._note_unused_settings()

    # -- checks -------------------------------------------------------------------------------
    @property
    def output_kind(self) -> Literal["model", "adapter"]:
        if self.kind == "adapter" and self.recipe.parameters.output == "adapter":
            return "adapter"
        return "model"

    @property
    def space(self) -> str:
        return self.recipe.parameters.space

    def _check_method(self) -> None:
        wanted = self.method.num_models
        if wanted is not None and len(self.models) != wanted:
            raise MiraError(f"{self.method.name} merges exactly {wanted} models, got {len(self.models)}",
                            where="models")
        self.method.validate(self.weights, self.params)

    def _place_base_model(self) -> None:
        """A full-model ``base_model`` that is also listed in ``models`` (or must be), as mergekit treats it.

        slerp (``base_is_endpoint``): the base is the ``t = 0`` end, so it goes first; with only
        the other model listed it is added. Task-vector methods: a listed base is the base only,
        not one more (zero) task vector, so its weight does not count in ``normalize``.
        """
        path = self.recipe.base_model
        if path is None or self.kind != "model":
            return
        target = Path(path).resolve()
        is_base = [m.path.resolve() == target for m in self.models]
        order = list(range(len(self.models)))
        if self.method.base_is_endpoint:
            if any(is_base):
                first = is_base.index(True)
                order = [first] + [i for i in order if i != first]
            elif self.method.num_models is not None and len(self.models) == self.method.num_models - 1:
                self.models.insert(0, Checkpoint.open(path, where="base_model"))
                self.weights.insert(0, 1.0)
                order = list(range(len(self.models)))
                densities = self.params.densities
                if densities is not None:
                    self.params = dataclasses.replace(self.params, densities=(1.0, *densities))
            else:
                raise MiraError(f"{self.method.name} interpolates from base_model (t = 0) to the other model: "
                                "list base_model among the models, or list only the other model",
                                where="base_model")
        elif self.method.uses_base and any(is_base):
            order = [i for i in order if not is_base[i]]
            if not order:
                raise MiraError("models lists only base_model: there is nothing to merge", where="models")
            logger.info("base_model is also listed in models; as in mergekit it is used as the base only")
        else:
            return
        self.models = [self.models[i] for i in order]
        self.weights = [self.weights[i] for i in order]
        densities = self.params.densities
        if densities is not None:
            self.params = dataclasses.replace(self.params, densities=tuple(densities[i] for i in order))
        if self.method.base_is_endpoint:
            logger.info("%s: t = 0 is base_model %s, t = 1 is %s", self.method.name, self.models[0].path,
                        ", ".join(str(m.path) for m in self.models[1:]))

    def _open_base(self) -> Checkpoint | None:
        """The base model, when this merge uses one."""
        path = self.recipe.base_model
        if path is not None and self.kind == "model" and self.method.base_is_endpoint:
            return None  # one of the models now (``_place_base_model``)
        folds_adapters = self.kind == "adapter" and self.output_kind == "model"
        needs_base = folds_adapters or (self.kind == "model" and self.method.uses_base)
        if path is None and folds_adapters:
            path = self._base_from_adapter_config()
        if path is None:
            if needs_base:
                raise MiraError(f"{self.method.name} works on task vectors (model - base): set base_model",
                                where="base_model")
            return None
        if not needs_base:
            self._warn(f"base_model is not used by {self.method.name} on {_describe(self.kind)}s; ignoring it")
            return None
        base = Checkpoint.open(path, where="base_model")
        if base.kind != "model":
            raise MiraError(f"{base.path} is a {_describe(base.kind)}; base_model must be a full model",
                            where="base_model")
        return base

    def _base_from_adapter_config(self) -> str | None:
        name = self.models[0].config.get("base_model_name_or_path")
        if name and Path(name).is_dir():
            self._warn(f"base_model not set; using {name} from {self.models[0].path / ADAPTER_CONFIG}")
            return name
        raise MiraError("output: model folds the merged adapter into a base model: set base_model",
                        where="base_model")

    def _check_compatible(self) -> None:
        reference = self.models[0]
        if self.kind == "model":
            for other in self.models[1:] + ([self.base] if self.base else []):
                _check_same_architecture(reference, other)
                _check_same_tensors(reference, other, shapes=True)
                _check_same_config(reference, other)
            return
        for adapter in self.models:
            if adapter.config.get("peft_type", "LORA") != "LORA":
                raise MiraError(f"{adapter.path} is a {adapter.config.get('peft_type')} adapter; only LoRA "
                                "adapters can be merged", where=adapter.where)
            if self.space == "delta":
                lora.check_delta_supported(adapter)
        base_names = {a.config.get("base_model_name_or_path") for a in self.models}
        if len(base_names) > 1:
            self._warn(f"the adapters name different base models: {sorted(map(str, base_names))}")
        for other in self.models[1:]:
            _check_same_tensors(reference, other, shapes=self.space == "factors")
            if self.space == "delta":
                _check_module_dims(reference, other)
        if self.base is not None:
            self._check_adapter_fits_base()

    def _check_adapter_fits_base(self) -> None:
        assert self.base is not None
        adapter = self.models[0]
        others = [k for k in adapter.names if not lora.is_factor_key(k)]
        if others:
            raise MiraError(f"output: model cannot fold non-LoRA adapter tensors such as {others[0]} into the base",
                            where=adapter.where)
        for module in lora.lora_modules(adapter.names, adapter.where):
            spec = self.base.specs.get(module.weight_key)
            if spec is None:
                raise MiraError(f"the base model has no {module.weight_key} for the adapter's module {module.name}",
                                where="base_model")
            if spec.shape != self._delta_shape(adapter, module):
                raise MiraError(f"{module.weight_key} has shape {spec.shape} but the adapter's delta is "
                                f"{self._delta_shape(adapter, module)}", where="base_model")

    def _note_unused_settings(self) -> None:
        used = self.method.parameters | _ALWAYS_ALLOWED | (_LORA_ONLY_PARAMETERS if self.kind == "adapter" else set())
        for name in sorted(self.recipe.set_fields() - used):
            if name in _LORA_ONLY_PARAMETERS:
                self._warn(f"parameters.{name} only applies to LoRA adapters; ignoring it")
            else:
                self._warn(f"parameters.{name} is not used by {self.method.name}; ignoring it")
        refactors = self.kind == "adapter" and self.space == "delta" and self.output_kind == "adapter"
        if self.kind == "adapter" and not refactors and "rank" in self.recipe.set_fields():
            self._warn("parameters.rank only applies to space: delta with output: adapter; ignoring it")
        for i, entry in enumerate(self.recipe.models):
            for name in sorted(entry.parameters.model_fields_set - self.method.model_parameters):
                self._warn(f"models[{i}].parameters.{name} is not used by {self.method.name}; ignoring it")

    def _warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)

    # -- plans --------------------------------------------------------------------------------
    def plan(self) -> tuple[list[_Planned], str, Path]:
        """The output tensors in write order, the shard file stem, and the folder to copy side files from."""
        if self.kind == "model":
            return self._plan_models(), "model", self.models[0].path
        if self.output_kind == "model":
            assert self.base is not None
            return self._plan_adapters_into_base(), "model", self.base.path
        if self.space == "factors":
            return self._plan_adapter_factors(), "adapter_model", self.models[0].path
        return self._plan_adapter_deltas(), "adapter_model", self.models[0].path

    def _plan_models(self) -> list[_Planned]:
        reference = self.models[0]
        return [_Planned(self._out_spec(reference.specs[name]), self._model_tensor(name)) for name in reference.names]

    def _model_tensor(self, name: str) -> Callable[[], Tensor]:
        def produce() -> Tensor:
            spec = self._out_spec(self.models[0].specs[name])
            if not spec.dtype.is_floating_point:
                return self.models[0].read(name)
            tensors = self._inputs(lambda model: model.read(name).float())
            base = self.base.read(name).float() if self.base is not None else None
            return self._merge(name, tensors, base).to(spec.dtype)

        return produce

    def _plan_adapter_factors(self) -> list[_Planned]:
        reference = self.models[0]
        modules = lora.lora_modules(reference.names, reference.where)
        self._ranks = {m.name: reference.specs[m.a_key].shape[0] for m in modules}
        plan = []
        for name in reference.names:
            spec = self._out_spec(reference.specs[name])
            if lora.is_factor_key(name):
                produce = self._factor_tensor(name, spec.dtype)
            else:
                produce = self._averaged_tensor(name, spec.dtype)
            plan.append(_Planned(spec, produce))
        return plan

    def _factor_tensor(self, name: str, dtype: torch.dtype) -> Callable[[], Tensor]:
        return lambda: self._merge(name, self._inputs(lambda adapter: self._read_factor(adapter, name)), None).to(dtype)

    def _averaged_tensor(self, name: str, dtype: torch.dtype) -> Callable[[], Tensor]:
        """Non-LoRA adapter tensors (e.g. ``modules_to_save``) are full weights: weighted mean."""

        def produce() -> Tensor:
            tensors = self._inputs(lambda adapter: adapter.read(name).float())
            weights = self.weights if abs(sum(self.weights)) > 1e-12 else [1.0] * len(self.weights)
            return (weighted_sum(tensors, weights) / sum(weights)).to(dtype)

        return produce

    def _plan_adapter_deltas(self) -> list[_Planned]:
        reference = self.models[0]
        modules = lora.lora_modules(reference.names, reference.where)
        rank = self.recipe.parameters.rank or max(a.specs[m.a_key].shape[0] for a in self.models for m in modules)
        self._ranks = {m.name: rank for m in modules}
        factors: dict[str, Tensor] = {}  # B waiting to be written right after its A

        def produce_a(module: lora.LoraModule, dtype: torch.dtype) -> Callable[[], Tensor]:
            def produce() -> Tensor:
                a, b = lora.refactor(self._merged_delta(module), rank)
                factors[module.b_key] = b.to(dtype)
                return a.to(dtype)

            return produce

        plan = []
        for module in modules:
            a_spec, b_spec = reference.specs[module.a_key], reference.specs[module.b_key]
            dtype = self._out_spec(a_spec).dtype
            plan.append(_Planned(TensorSpec(module.a_key, (rank, a_spec.shape[1]), dtype), produce_a(module, dtype)))
            plan.append(_Planned(TensorSpec(module.b_key, (b_spec.shape[0], rank), dtype),
                                 lambda key=module.b_key: factors.pop(key)))
        for name in reference.names:
            if not lora.is_factor_key(name):
                spec = self._out_spec(reference.specs[name])
                plan.append(_Planned(spec, self._averaged_tensor(name, spec.dtype)))
        return plan

    def _plan_adapters_into_base(self) -> list[_Planned]:
        assert self.base is not None
        base = self.base
        modules = {m.weight_key: m for m in lora.lora_modules(self.models[0].names, self.models[0].where)}
        fan_in_fan_out = bool(self.models[0].config.get("fan_in_fan_out"))

        def folded(name: str, module: lora.LoraModule, dtype: torch.dtype) -> Callable[[], Tensor]:
            def produce() -> Tensor:
                delta = self._folded_delta(module)
                return (base.read(name).float() + (delta.T if fan_in_fan_out else delta)).to(dtype)

            return produce

        def copied(name: str, dtype: torch.dtype) -> Callable[[], Tensor]:
            return lambda: base.read(name).to(dtype)

        plan = []
        for name in base.names:
            spec = self._out_spec(base.specs[name])
            module = modules.get(name)
            plan.append(_Planned(spec, folded(name, module, spec.dtype) if module else copied(name, spec.dtype)))
        return plan

    # -- tensor arithmetic -------------------------------------------------------------------
    def _merge(self, name: str, tensors: LazyTensors, base: Tensor | None) -> Tensor:
        return self.method.merge_tensor(tensors, self.weights, base, dataclasses.replace(self.params, name=name))

    def _inputs(self, load: Callable[[Checkpoint], Tensor]) -> LazyTensors:
        """The inputs' versions of one tensor, read from disk only when the method asks for them."""
        return LazyTensors(lambda i: load(self.models[i]), len(self.models))

    def _read_factor(self, adapter: Checkpoint, key: str) -> Tensor:
        """A LoRA tensor in float32, with the adapter's scaling folded into the B factors."""
        tensor = adapter.read(key).float()
        if ".lora_B" in key or ".lora_embedding_B" in key:
            module = key.removeprefix(lora.KEY_PREFIX).split(".lora_", 1)[0]
            tensor *= lora.scaling(adapter.config, module, rank=tensor.shape[1])
        return tensor

    def _delta(self, adapter: Checkpoint, module: lora.LoraModule) -> Tensor:
        """``scaling * B @ A`` of one adapter (in the LoRA layer's orientation)."""
        a = adapter.read(module.a_key).float()
        return self._read_factor(adapter, module.b_key) @ a

    def _merged_delta(self, module: lora.LoraModule) -> Tensor:
        """The method applied to the adapters' deltas (``space: delta``)."""
        return self._merge(f"{module.name}.delta", self._inputs(lambda adapter: self._delta(adapter, module)), None)

    def _folded_delta(self, module: lora.LoraModule) -> Tensor:
        """The merged delta to add to the base weight, in either space."""
        if self.space == "delta":
            return self._merged_delta(module)
        a = self._merge(module.a_key, self._inputs(lambda adapter: self._read_factor(adapter, module.a_key)), None)
        b = self._merge(module.b_key, self._inputs(lambda adapter: self._read_factor(adapter, module.b_key)), None)
        return b @ a

    def _delta_shape(self, adapter: Checkpoint, module: lora.LoraModule) -> tuple[int, ...]:
        out_features, in_features = adapter.specs[module.b_key].shape[0], adapter.specs[module.a_key].shape[1]
        if adapter.config.get("fan_in_fan_out"):
            return (in_features, out_features)
        return (out_features, in_features)

    def _out_spec(self, spec: TensorSpec) -> TensorSpec:
        if self.dtype is None or not spec.dtype.is_floating_point:
            return spec
        return TensorSpec(spec.name, spec.shape, self.dtype)

    # -- side files ---------------------------------------------------------------------------
    def write_configs(self, out: Path) -> None:
        """Write the output's ``adapter_config.json``, or fix the dtype in ``config.json``."""
        if self.output_kind == "adapter":
            config = lora.output_config(self.models[0].config, self._ranks)
            (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        elif self.recipe.dtype and (out / MODEL_CONFIG).is_file():
            config = json.loads((out / MODEL_CONFIG).read_text())
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
            for key in keys:
                config[key] = self.recipe.dtype
            (out / MODEL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _describe(kind: str) -> str:
    return "LoRA adapter" if kind == "adapter" else "full model"


# config.json fields that fix the shapes and the meaning of the weights: two models whose tensors have the
# same names and shapes can still differ here (e.g. 4 heads of 8 or 8 heads of 4), and their merge is noise
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "tie_word_embeddings", "n_embd", "n_head", "n_layer", "d_model")


def _check_same_architecture(reference: Checkpoint, other: Checkpoint) -> None:
    for key in ("model_type", "architectures"):
        if reference.config.get(key) != other.config.get(key):
            raise MiraError(f"{other.path} has {key} {other.config.get(key)!r} but {reference.where} has "
                            f"{reference.config.get(key)!r}; models of one architecture only", where=other.where)


def _check_same_config(reference: Checkpoint, other: Checkpoint) -> None:
    """After the tensors: the same names and shapes, but a config that reads them differently."""
    for key in _SHAPE_KEYS:
        if key in reference.config and key in other.config and reference.config[key] != other.config[key]:
            raise MiraError(f"{other.path} has {key} {other.config[key]!r} but {reference.where} has "
                            f"{reference.config[key]!r}: the same tensors mean different things, their merge "
                            "would be noise", where=other.where)


def _check_same_tensors(reference: Checkpoint, other: Checkpoint, shapes: bool) -> None:
    missing = [n for n in reference.names if n not in other.specs]
    extra = [n for n in other.names if n not in reference.specs]
    if missing or extra:
        detail = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}"
        raise MiraError(f"{other.path} does not have the same tensors as {reference.where}: it {detail} "
                        f"({len(missing)} missing, {len(extra)} extra)", where=other.where)
    if shapes:
        for name, spec in reference.specs.items():
            if other.specs[name].shape != spec.shape:
                raise MiraError(f"tensor {name!r} has shape {other.specs[name].shape} in {other.path} but "
                                f"{spec.shape} in {reference.where}", where=other.where)


def _check_module_dims(reference: Checkpoint, other: Checkpoint) -> None:
    """In delta space ranks may differ, but each module's in and out features must agree."""
    for module in lora.lora_modules(reference.names, reference.where):
        ref = (reference.specs[module.b_key].shape[0], reference.specs[module.a_key].shape[-1])
        got = (other.specs[module.b_key].shape[0], other.specs[module.a_key].shape[-1])
        if ref != got:
            raise MiraError(f"module {module.name} maps {got[1]} -> {got[0]} features in {other.path} but "
                            f"{ref[1]} -> {ref[0]} in {reference.where}", where=other.where)
