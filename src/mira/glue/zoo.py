"""The zoo file (``mira glue ZOO.yaml``) and loading its members into memory.

A zoo lists models or LoRA adapters, an optional base model, and a small validation set
per target task::

    base_model: ${MIRA_ASSETS}/models/stories260K   # adapters: default from adapter_config.json
    members:                                         # or `run: runs/x` (adapters/client_* + summary.json)
      - {name: brainstorming, path: runs/x/adapters/client_0, task: brainstorming}
    validation:                                      # a JSONL of Record fields, or a `data:` source spec
      path: val.jsonl
      tasks: [brainstorming, open_qa]
      max_per_task: 16
      max_length: 256                                # template: auto|alpaca|compact|chat; overflow: drop|truncate_input
    test: {...}                                      # optional held-out set, same format
    cluster: {threshold: 0.95}
    strategy: {name: heuristic_coefficient, budget: 40}
    mixture: {kind: auto, gate: linear, temperature: auto, train_steps: 0}

Relative paths are resolved against the current folder, then against the zoo file's.
Every mistake is a ``MiraError`` naming the field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mira.errors import MiraError
from mira.userfiles import pydantic_message, read_text, read_yaml


class _Strict(BaseModel):
    # as the run config: no silent coercion, every float finite
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class MemberSpec(_Strict):
    """One zoo member: a PEFT adapter folder or a Hugging Face model folder."""

    path: str
    name: str | None = None
    task: str | None = None
    """The task the member was trained for (its "own prompts" for the router)."""


class EvalSetSpec(_Strict):
    """A validation or test set: ``path`` (JSONL/JSON with Record fields) or ``data`` (a source spec)."""

    path: str | None = None
    data: dict[str, Any] | None = None
    tasks: list[str] | None = None
    max_per_task: int = Field(16, gt=0)
    max_length: int = Field(256, gt=8)
    template: str = "auto"  # mira.data.prompts: auto (chat if the tokenizer has one, else alpaca), compact, ...
    overflow: Literal["drop", "truncate_input"] = "drop"
    skip_per_task: int = Field(0, ge=0)
    """Drop, per task, exactly the records a run drew with ``data.max_per_task: skip_per_task`` and
    ``data.seed: seed`` on the same source and tasks (its training and test records)."""
    seed: int = 0


class ClusterSpec(_Strict):
    threshold: float = Field(0.95, ge=-1.0, le=1.0)


class StrategySpec(_Strict):
    name: str = "heuristic_coefficient"
    budget: int = Field(40, gt=0)
    """Most validation evaluations per cluster (evolutionary: 40 = the best member + 4 complete CMA-ES
    generations of 8 + a partial one, for 4+ members); the heuristics need fewer."""
    sigma: float = Field(0.3, gt=0)
    method: str | None = None
    """In-memory merge method; default ``linear`` (adapters, factors) or ``task_arithmetic`` (models + base)."""


class MixtureSpec(_Strict):
    kind: Literal["auto", "router", "lora"] = "auto"
    """The final model: ``router`` picks one cluster merge per input; ``lora`` mixes them per sequence;
    ``auto`` takes whichever of the two has the lower validation loss (``router`` for full models)."""
    gate: Literal["centroid", "linear"] = "linear"
    """``linear``: a softmax regression on the frozen (standardised) prompt features, trained on the
    validation prompts towards their own task's expert; ``centroid``: cosine to per-expert centroids."""
    temperature: float | Literal["auto"] = "auto"
    """Centroid gate: softmax temperature of the cosines; ``auto`` calibrates it on validation."""
    train_steps: int = Field(0, ge=0)
    lr: float = Field(0.05, gt=0)


class ZooSpec(_Strict):
    base_model: str | None = None
    members: list[MemberSpec] = Field(default_factory=list)
    run: str | None = None
    validation: EvalSetSpec
    test: EvalSetSpec | None = None
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    mixture: MixtureSpec = Field(default_factory=MixtureSpec)
    batch_size: int = Field(16, gt=0)
    seed: int = 0


def load_zoo(source: str | os.PathLike | dict) -> tuple[ZooSpec, Path]:
    """Parse a zoo file (or dict); return the spec and the folder relative paths resolve against."""
    from mira.config import _expand

    at = ""  # the zoo file, before the field of an error
    if isinstance(source, dict):
        raw, root = source, Path.cwd()
    else:
        p = Path(source)
        if not p.exists():
            raise MiraError(f"zoo file not found: {source}", where="zoo")
        raw = read_yaml(p, "zoo file") or {}
        root = p.resolve().parent
        at = f"{p}: "
    if not isinstance(raw, dict):
        raise MiraError("a zoo file is a mapping (base_model, members, validation, ...)", where=at[:-2] or "zoo")
    raw = _expand(raw, "")
    try:
        spec = ZooSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "zoo"
        raise MiraError(pydantic_message(err), where=at + where) from None
    if not spec.members and not spec.run:
        raise MiraError("list the zoo's members (members: [...]) or a run folder (run: DIR)", where=at + "members")
    for name, es in (("validation", spec.validation), ("test", spec.test)):
        if es is not None and (es.path is None) == (es.data is None):
            raise MiraError("give exactly one of path (a JSONL file) or data (a source spec)", where=at + name)
    return spec, root


def resolve(path: str, root: Path, where: str) -> Path:
    """``path`` as given if it exists, else relative to ``root``; an error if neither exists."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return p
    if not p.is_absolute() and (root / p).exists():
        return root / p
    raise MiraError(f"not found: {path}", where=where)


@dataclass
class Member:
    """A zoo member in memory: its tensors (PEFT key names for adapters), kind and task."""

    name: str
    path: Path
    kind: Literal["adapter", "model"]
    state: dict[str, torch.Tensor]
    task: str | None = None
    model_type: str = ""
    config: dict = field(default_factory=dict)
    """adapter_config.json (adapters) or config.json (models)."""
    lora: tuple = ()
    """Adapters: ``((module, rank, scaling), ...)`` as PEFT applies them (rank, alpha, rsLoRA, patterns, targets)."""
    shapes: tuple = ()
    """Every tensor's name and shape as stored in the member's files."""

    def __post_init__(self) -> None:
        if not self.shapes:
            self.shapes = tuple(sorted((k, tuple(v.shape)) for k, v in self.state.items()))

    @property
    def signature(self) -> tuple:
        """Architecture key: model type, every stored tensor's name and shape, and (adapters) each module's
        rank and PEFT scaling -- everything that changes the function the member computes."""
        return (self.kind, self.model_type, self.shapes, self.lora)


def lora_settings(state: dict[str, torch.Tensor], cfg: dict, where: str) -> tuple:
    """``((module, rank, scaling), ...)`` of a PEFT LoRA adapter; a ``MiraError`` for what glue cannot score."""
    from mira.merge.lora import lora_modules, scaling

    if cfg.get("use_dora"):
        raise MiraError("DoRA adapters are not supported by mira glue (LoRA only)", where=where)
    modules = lora_modules(state, where)
    covered = {k for m in modules for k in (m.a_key, m.b_key)}
    odd = [k for k in state if k not in covered]
    if odd or not modules:
        raise MiraError(f"mira glue supports LoRA on linear layers only; the adapter also has {odd[0]}" if odd
                        else "the adapter has no lora_A/lora_B weights", where=where)
    out = []
    for m in modules:
        rank = int(state[m.a_key].shape[0])
        out.append((m.name, rank, float(scaling(cfg, m.name, rank))))
    return tuple(sorted(out))


def normalise_adapters(members: list[Member]) -> tuple[int, list[str]]:
    """Rewrite every adapter member's state, exactly, in one common form; return ``(rank, modules)``.

    The common form has PEFT scaling 1 (the member's ``alpha / r`` or ``alpha / sqrt(r)`` folded
    into ``B``), the largest rank of the zoo (``A`` padded with zero rows, ``B`` with zero columns)
    and the union of the modules (zero factors where a member has none), so ``B @ A`` of every
    module equals the delta PEFT applies for that member. One LoRA slot then scores them all.
    """
    from mira.merge.lora import KEY_PREFIX

    rank = max(r for m in members for _, r, _ in m.lora)
    shapes: dict[str, tuple[int, int]] = {}
    for m in members:
        for name, _r, _s in m.lora:
            a = m.state[f"{KEY_PREFIX}{name}.lora_A.weight"]
            b = m.state[f"{KEY_PREFIX}{name}.lora_B.weight"]
            shape = (int(b.shape[0]), int(a.shape[1]))
            if shapes.setdefault(name, shape) != shape:
                raise MiraError(f"adapters disagree on the shape of module {name}: {shapes[name]} vs {shape}",
                                where=f"members ({m.name})")
    modules = sorted(shapes)
    for m in members:
        own = {name: (r, s) for name, r, s in m.lora}
        new: dict[str, torch.Tensor] = {}
        for name in modules:
            out_f, in_f = shapes[name]
            a_key, b_key = f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"
            a = torch.zeros(rank, in_f)
            b = torch.zeros(out_f, rank)
            if name in own:
                r, s = own[name]
                a[:r] = m.state[a_key].float()
                b[:, :r] = m.state[b_key].float() * s
            new[a_key], new[b_key] = a, b
        m.state = new
    return rank, modules


def _read_tensors(folder: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("*.bin"))
    if not files and not bins:
        raise MiraError(f"{folder} has no weights (*.safetensors or *.bin)", where=where)
    out: dict[str, torch.Tensor] = {}
    for f in files or bins:
        try:
            out.update(load_file(str(f)) if files else torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError (bad zip), EOFError: a broken file
            if isinstance(e, MiraError):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MiraError(f"cannot read {f} (empty, truncated or corrupt): {first}", where=where) from None
    return out


def _read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(read_text(path, "JSON file"))
    except json.JSONDecodeError as e:
        raise MiraError(f"malformed JSON: {e.msg}", where=f"{path}:{e.lineno}") from None
    if not isinstance(data, dict):
        raise MiraError(f"{path} is not a JSON object", where=where)
    return data


def _model_type(folder: Path) -> str:
    cfg = folder / "config.json"
    if cfg.exists():
        return str(_read_json(cfg, "base_model").get("model_type", ""))
    return ""


def member_specs(spec: ZooSpec, root: Path) -> list[MemberSpec]:
    """The explicit members plus, with ``run:``, each ``adapters/client_*`` of that run (task from summary.json)."""
    out = list(spec.members)
    if spec.run:
        run = resolve(spec.run, root, "run")
        tasks: dict[int, str] = {}
        summary = run / "summary.json"
        if summary.exists():
            tasks = {int(c["id"]): c.get("task") for c in json.loads(summary.read_text()).get("clients", [])}
        folders = sorted((run / "adapters").glob("client_*"), key=lambda p: int(p.name.split("_")[-1]))
        if not folders:
            raise MiraError(f"{run} has no adapters/client_* folders", where="run")
        for f in folders:
            cid = int(f.name.split("_")[-1])
            task = tasks.get(cid)
            out.append(MemberSpec(path=str(f), name=f"client_{cid}" + (f":{task}" if task else ""), task=task))
    return out


def load_members(spec: ZooSpec, root: Path) -> tuple[list[Member], Path | None]:
    """Load every member's tensors; return them and the base model folder (``None`` if not needed)."""
    members: list[Member] = []
    base = resolve(spec.base_model, root, "base_model") if spec.base_model else None
    names: set[str] = set()
    for i, m in enumerate(member_specs(spec, root)):
        where = f"members[{i}]"
        folder = resolve(m.path, root, f"{where}.path")
        if not folder.is_dir():
            raise MiraError(f"{m.path} is not a folder", where=f"{where}.path")
        name = m.name or folder.name
        if name in names:
            name = f"{name}#{i}"
        names.add(name)
        if (folder / "adapter_config.json").exists():
            cfg = _read_json(folder / "adapter_config.json", where)
            if cfg.get("peft_type", "LORA") != "LORA":
                raise MiraError(f"only LoRA adapters are supported, not {cfg.get('peft_type')}", where=where)
            if base is None:
                guess = cfg.get("base_model_name_or_path")
                if not guess or not Path(guess).exists():
                    raise MiraError("adapters need a base model: set base_model", where="base_model")
                base = Path(guess)
            state = _read_tensors(folder, where)
            members.append(Member(name, folder, "adapter", state, m.task, _model_type(base) + "+lora", cfg,
                                  lora=lora_settings(state, cfg, where)))
        elif (folder / "config.json").exists():
            members.append(Member(name, folder, "model", _read_tensors(folder, where), m.task, _model_type(folder),
                                  _read_json(folder / "config.json", where)))
        else:
            raise MiraError(f"{m.path} is neither a PEFT adapter nor a Hugging Face model folder", where=where)
    if not members:
        raise MiraError("the zoo has no members", where="members")
    kinds = {m.kind for m in members}
    if len(kinds) > 1:
        raise MiraError("mix of adapters and full models: use one kind per zoo", where="members")
    if members[0].kind == "adapter":
        normalise_adapters(members)
    return members, base
