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
from mira.userfiles import decode, read_text


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


def _need_path(cfg, what: str, folder: bool = False) -> Path:
    """``data.path``, which must exist; and be a file unless ``folder`` (a folder of files is accepted)."""
    if not cfg.path:
        raise MiraError(f"data.path is required for source {cfg.source!r} ({what})", where="data.path")
    p = Path(os.path.expanduser(cfg.path))
    if not p.exists():
        raise MiraError(f"not found: {cfg.path}", where="data.path")
    if p.is_dir() and not folder:
        raise MiraError(f"{cfg.path} is a folder; source {cfg.source!r} reads {what}", where="data.path")
    return p


def _files_in(folder: Path, pattern: str, what: str) -> list[Path]:
    files = sorted(f for f in folder.glob(pattern) if f.is_file())
    if not files:
        raise MiraError(f"{folder} is a folder with no {what} files", where="data.path")
    return files


def _not_an_object(obj) -> str:
    return f"expected a JSON object (a record), got {'null' if obj is None else type(obj).__name__} {str(obj)[:40]}"


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` from a JSONL file, or from a JSON list file (the line where
    each object starts). Unreadable bytes, malformed JSON or an item that is not an object is a
    ``MiraError`` at ``path:line``."""
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise MiraError(f"{path} is a folder, not a JSON or JSONL file", where="data.path") from None
    except OSError as e:
        raise MiraError(f"cannot read {path}: {e.strerror or e}", where="data.path") from None
    with f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == b"[":
            yield from _json_list(path, decode(f.read(), path))
            return
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MiraError(f"not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8",
                                where=f"{path}:{lineno}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MiraError(f"malformed JSON line: {e.msg}", where=f"{path}:{lineno}") from e
            if not isinstance(obj, dict):
                raise MiraError(_not_an_object(obj), where=f"{path}:{lineno}")
            yield lineno, obj


def _json_list(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """The objects of a JSON list file, each with the line where it starts."""
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    try:
        pos = skip(pos)
        if pos < len(text) and text[pos] == "]":
            return
        while True:
            obj, end = decoder.raw_decode(text, pos)
            line += text.count("\n", counted, pos)
            counted = pos
            if not isinstance(obj, dict):
                raise MiraError(_not_an_object(obj), where=f"{path}:{line}")
            yield line, obj
            pos = skip(end)
            if pos < len(text) and text[pos] == "]":
                return
            if pos >= len(text) or text[pos] != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = skip(pos + 1)
    except json.JSONDecodeError as e:
        raise MiraError(f"malformed JSON: {e.msg}", where=f"{path}:{e.lineno}") from e


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
            if isinstance(val, list):  # e.g. several reference outputs: the first one
                if not val:
                    raise MiraError(f"field {key!r} (for {field}) is an empty list", where=where)
                val = val[0]
            return val if isinstance(val, str) else json.dumps(val)
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
        path = _need_path(cfg, "a .json or .jsonl file, or a folder of them", folder=True)
        files = _files_in(path, "*.json*", ".json or .jsonl") if path.is_dir() else [path]
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
        path = _need_path(cfg, "the natural-instructions-v1/tasks folder", folder=True)
        files = _files_in(path, "*.json", ".json task") if path.is_dir() else [path]
        if cfg.tasks:
            wanted = set(cfg.tasks)
            files = [f for f in files if f.stem in wanted]
            found = {f.stem for f in files}
            if wanted - found:
                raise MiraError(f"tasks not found in {path}: {sorted(wanted - found)}", where="data.tasks")
        out = []
        for file in files:
            try:
                obj = json.loads(read_text(file, "task file", where="data.path"))
            except json.JSONDecodeError as e:
                raise MiraError(f"malformed JSON: {e.msg}", where=f"{file}:{e.lineno}") from e
            definition = obj.get("Definition") if isinstance(obj, dict) else None
            if not isinstance(definition, str) or not isinstance(obj.get("Instances"), list):
                raise MiraError("missing field 'Definition' or 'Instances'", where=str(file))
            for i, inst in enumerate(obj["Instances"]):
                outputs = (inst.get("output") or []) if isinstance(inst, dict) else []
                outputs = [outputs] if isinstance(outputs, str) else outputs
                texts = [inst.get("input"), *outputs] if isinstance(inst, dict) and isinstance(outputs, list) else []
                if not outputs or not all(isinstance(x, str) for x in texts) or not texts:
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

