"""Reading the files a user names, and checking the paths a user gives for output.

Every reader of a user's file (a config, a recipe, a zoo, a data file) goes through
``read_text``/``read_yaml`` or ``decode``, so that a missing file, a folder where a file
was meant, unreadable bytes or malformed YAML are all a one-line ``MiraError`` that names
the file (and the line, where there is one), never a ``UnicodeDecodeError`` traceback.
``check_out_folder``/``check_out_file`` refuse an output path of the wrong kind before
anything is computed or written.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mira.errors import MiraError


def _read_bytes(path: Path, what: str, where: str | None) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise MiraError(f"{path} is a folder, not a {what}", where=where) from None
    except FileNotFoundError:
        raise MiraError(f"{what} not found: {path}", where=where) from None
    except OSError as e:
        raise MiraError(f"cannot read {path}: {e.strerror or e}", where=where) from None


def decode(data: bytes, path: str | os.PathLike) -> str:
    """``data`` (the bytes of the file ``path``) as UTF-8 text; else a ``MiraError`` at ``path:line``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MiraError(f"not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8",
                        where=f"{path}:{line}") from None


def read_text(path: str | os.PathLike, what: str = "file", where: str | None = None) -> str:
    """The UTF-8 text of the file ``path``; a ``MiraError`` naming it when it is missing, a folder,
    unreadable or not UTF-8 (``what`` names the kind of file in the message)."""
    p = Path(path)
    return decode(_read_bytes(p, what, where), p)


def yaml_where(e: Exception, path: str | os.PathLike, text: str) -> tuple[str, str]:
    """``(message, "path:line")`` for a ``yaml.YAMLError`` in the text of ``path``.

    An error found at the end of the file (an unclosed bracket or quote) is reported at
    the line where the unclosed construct starts, not at a line past the last one."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    lines = max(1, len(text.splitlines()))
    message = f"malformed YAML: {problem}"
    if mark is not None and mark.line + 1 > lines and context is not None:
        mark = context
        message = f"malformed YAML: {getattr(e, 'context', '') or 'here'}: {problem}"
    if mark is None:
        return message, str(path)
    return message, f"{path}:{min(mark.line + 1, lines)}"


_LOADER = None


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that ``3e-4`` is a float, as in YAML 1.2 (PyYAML's YAML 1.1 wants
    ``3.0e-4`` and reads ``3e-4`` as a string, which the strict config would then refuse)."""
    global _LOADER
    import re

    import yaml

    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
            r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))
        _LOADER = Loader
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a SafeLoader


def read_yaml(path: str | os.PathLike, what: str = "YAML file", where: str | None = None) -> Any:
    """The parsed YAML of the file ``path`` (None for an empty file); ``MiraError`` otherwise."""
    import yaml

    text = read_text(path, what, where)
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        message, at = yaml_where(e, path, text)
        raise MiraError(message, where=at) from None


def check_out_folder(path: str | os.PathLike, where: str = "--out") -> None:
    """Refuse an output folder that is an existing file (``--overwrite`` would replace the file)."""
    p = Path(path)
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        raise MiraError(f"{p} is a file, not a folder; name a new or empty folder", where=where)
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MiraError(f"{parent} is a file, so {p} cannot be created", where=where)
            break


def check_out_file(path: str | os.PathLike, where: str = "--out") -> None:
    """Refuse an output file that is an existing folder, or whose folder is a file."""
    p = Path(path)
    if p.is_dir():
        raise MiraError(f"{p} is a folder; name the file to write (e.g. {p / 'refined.jsonl'})", where=where)
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MiraError(f"{parent} is a file, so {p} cannot be created", where=where)
            break


def first_non_finite(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], float] | None:
    """The location (keys, as written in YAML) and value of the first ``inf``/``nan`` float in
    ``value`` (a pydantic model, a mapping, a list or a number), or None."""
    from pydantic import BaseModel

    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, BaseModel):
        items = [(f.alias or name, getattr(value, name)) for name, f in type(value).model_fields.items()]
        items += list((value.model_extra or {}).items())
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for key, item in items:
        found = first_non_finite(item, path + (str(key),))
        if found is not None:
            return found
    return None


def dotted(keys: tuple[str, ...]) -> str:
    """``("models", "[0]", "weight")`` -> ``models[0].weight``."""
    out = ""
    for key in keys:
        out += key if key.startswith("[") or not out else f".{key}"
    return out


def pydantic_message(err: dict) -> str:
    """The message of one pydantic error, with the value given when its type was wrong."""
    msg = err["msg"].removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind.endswith(("_type", "_parsing")) or kind in ("finite_number", "int_from_float", "literal_error"):
        given = err.get("input")
        if not isinstance(given, (dict, list)):
            msg += f", got {given!r}" + (f" ({type(given).__name__})" if isinstance(given, (bool, str)) else "")
    return msg
