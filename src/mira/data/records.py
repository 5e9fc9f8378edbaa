"""Instruction records and the loaders that make them.

A ``Record`` is one example: ``instruction``, optional ``input`` (context), ``output``
(response) and ``task``. Each source is a small class registered by name in
``SOURCES``; ``load_records(cfg)`` picks one by ``cfg.source``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Iterator

from mira.errors import MiraError


@dataclass(frozen=True)
class Record:
    instruction: str
    output: str
    input: str = ""
    task: str = "default"

    def to_dict(self) -> dict:
        return asdict(self)


SOURCES: dict[str, type["Source"]] = {}


def register_source(cls):
    SOURCES[cls.name] = cls
    return cls


def _need_path(cfg, what: str) -> Path:
    if not cfg.path:
        raise MiraError(f"data.path is required for source {cfg.source!r} ({what})", where="data.path")
    p = Path(os.path.expanduser(cfg.path))
    if not p.exists():
        raise MiraError(f"not found: {cfg.path}", where="data.path")
    return p


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` from a JSONL file, or from a JSON list file (line 0)."""
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise MiraError(f"malformed JSON: {e.msg}", where=f"{path}:{e.lineno}") from e
            for obj in items:
                yield 0, obj
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MiraError(f"malformed JSON line: {e.msg}", where=f"{path}:{lineno}") from e
            if not isinstance(obj, dict):
                raise MiraError("expected a JSON object on each line", where=f"{path}:{lineno}")
            yield lineno, obj


class Source:
    """A data source: ``load(cfg) -> list[Record]``."""

    name: ClassVar[str]

    def load(self, cfg) -> list[Record]:
        raise NotImplementedError


def _mapped(obj: dict, field_map: dict[str, str], where: str, default_task: str) -> Record:
    def get(field: str, required: bool) -> str:
        key = field_map.get(field, field)
        if key in obj and obj[key] is not None:
            val = obj[key]
            return val if isinstance(val, str) else json.dumps(val) if not isinstance(val, list) else str(val[0])
        if required:
            raise MiraError(f"missing field {key!r} (for {field})", where=where)
        return ""

    return Record(instruction=get("instruction", True), input=get("input", False), output=get("output", True),
                  task=get("task", False) or default_task)


@register_source
class JsonSource(Source):
    """JSON or JSONL with a field mapping, e.g. ``{instruction: question, output: answer}``."""

    name = "json"

    def load(self, cfg) -> list[Record]:
        path = _need_path(cfg, "a .json or .jsonl file")
        files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
        out = []
        for file in files:
            for lineno, obj in iter_json_objects(file):
                out.append(_mapped(obj, cfg.field_map, f"{file}:{lineno}", default_task=file.stem))
        return out


@register_source
class DollySource(JsonSource):
    """databricks-dolly-15k: instruction, context, response, category (the task)."""

    name = "dolly"
    FIELDS = {"instruction": "instruction", "input": "context", "output": "response", "task": "category"}

    def load(self, cfg) -> list[Record]:
        path = _need_path(cfg, "databricks-dolly-15k.jsonl")
        return [_mapped(obj, self.FIELDS, f"{path}:{n}", "dolly") for n, obj in iter_json_objects(path)]


@register_source
class GSM8KSource(JsonSource):
    """GSM8K: question -> answer (the full worked solution ending in ``#### <number>``)."""

    name = "gsm8k"
    FIELDS = {"instruction": "question", "output": "answer"}

    def load(self, cfg) -> list[Record]:
        path = _need_path(cfg, "a GSM8K train.jsonl or test.jsonl")
        instruction = "Solve the math word problem. End with '#### <answer>'."
        return [Record(instruction=instruction, input=r.instruction, output=r.output, task="gsm8k")
                for r in (_mapped(obj, self.FIELDS, f"{path}:{n}", "gsm8k") for n, obj in iter_json_objects(path))]


@register_source
class NaturalInstructionsSource(Source):
    """Natural Instructions v1 task files: Definition + instance input -> output[0]."""

    name = "natural_instructions"

    def load(self, cfg) -> list[Record]:
        path = _need_path(cfg, "the natural-instructions-v1/tasks folder")
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if cfg.tasks:
            wanted = set(cfg.tasks)
            files = [f for f in files if f.stem in wanted]
            found = {f.stem for f in files}
            if wanted - found:
                raise MiraError(f"tasks not found in {path}: {sorted(wanted - found)}", where="data.tasks")
        out = []
        for file in files:
            try:
                obj = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise MiraError(f"malformed JSON: {e.msg}", where=f"{file}:{e.lineno}") from e
            definition = obj.get("Definition")
            if not isinstance(definition, str) or "Instances" not in obj:
                raise MiraError("missing field 'Definition' or 'Instances'", where=str(file))
            for i, inst in enumerate(obj["Instances"]):
                outputs = inst.get("output") or []
                if "input" not in inst or not outputs:
                    raise MiraError("instance without input or output", where=f"{file}: Instances[{i}]")
                out.append(Record(instruction=definition.strip(), input=inst["input"], output=outputs[0],
                                  task=file.stem))
        return out


@register_source
class HubSource(Source):
    """Any Hugging Face Hub dataset id (needs network and the `datasets` package)."""

    name = "hub"

    def load(self, cfg) -> list[Record]:
        try:
            import datasets
        except ImportError as e:
            raise MiraError("source 'hub' needs the `datasets` package: pip install 'mira[hub]'",
                            where="data.source") from e
        if not cfg.path:
            raise MiraError("data.path must be a Hub dataset id for source 'hub'", where="data.path")
        try:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        except Exception as e:  # network / not found
            raise MiraError(f"cannot load Hub dataset {cfg.path!r}: {str(e).splitlines()[0]}", where="data.path") from e
        return [_mapped(dict(row), cfg.field_map, f"{cfg.path}[{i}]", cfg.path) for i, row in enumerate(ds)]


@register_source
class SyntheticSource(Source):
    """mira's built-in multi-task suite (see ``mira.data.synthetic``); needs no file."""

    name = "synthetic"

    def load(self, cfg) -> list[Record]:
        from mira.data.synthetic import generate_suite

        return generate_suite(n_per_task=cfg.max_per_task or 200, seed=cfg.seed, tasks=cfg.tasks or None)


def load_records(cfg, seed: int = 0) -> list[Record]:
    """Load, filter by ``cfg.tasks`` and cap each task at ``cfg.max_per_task`` (seeded)."""
    import random

    if cfg.source not in SOURCES:
        raise MiraError(f"unknown data source {cfg.source!r}; choose one of {sorted(SOURCES)}", where="data.source")
    records = SOURCES[cfg.source]().load(cfg)
    if cfg.tasks:
        wanted = set(cfg.tasks)
        present = {r.task for r in records}
        if wanted - present:
            raise MiraError(f"tasks not present in the data: {sorted(wanted - present)} (have {sorted(present)[:10]})",
                            where="data.tasks")
        records = [r for r in records if r.task in wanted]
    records = [r for r in records if r.instruction.strip() and r.output.strip()]
    if not records:
        raise MiraError("no records with both an instruction and an output", where="data")
    if cfg.max_per_task:
        rng = random.Random(seed)
        by_task: dict[str, list[Record]] = {}
        for r in records:
            by_task.setdefault(r.task, []).append(r)
        records = []
        for task in sorted(by_task):
            group = by_task[task]
            records += rng.sample(group, cfg.max_per_task) if len(group) > cfg.max_per_task else group
    return records

