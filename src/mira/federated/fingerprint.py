"""What a run's result depends on, so that ``mira run --resume`` continues only the run it was.

A fingerprint is a flat ``{field: value}`` dict: every field of the resolved config (the
algorithm's options with their defaults filled in) except those that cannot change a number
(``plots``, ``model.device``), plus

* ``model.files[NAME]``: the sha256 of each file of a local model folder (of the first and last
  MiB, with the size, for files over 64 MiB);
* ``data.files[NAME]``: the sha256 of ``data.path``'s bytes (of each file when it is a folder);
* ``data.records``: the sha256 of the records each client holds (train, validation, test), which
  covers what the files cannot: Hub datasets, the synthetic suite, refinement;
* ``data.clients`` and ``adapter.shapes``: the number of clients and the adapter's tensor names and
  shapes, which the checkpoint's state is made of.

The engine stores it in every checkpoint (and in ``fingerprint.json`` beside it, for people). On
``--resume`` the current config and data are fingerprinted again and compared (``check``): a field
that differs stops the resume with one line naming it, unless it is named in ``--allow-changed``
(the user says the change is safe, e.g. ``eval.batch_size``). ``algorithm.name``, ``data.clients`` and
``adapter.shapes`` cannot be allowed: the checkpoint's state does not fit another algorithm, another
number of clients or other adapter shapes.

``federation.rounds`` may change on resume (to no fewer rounds than are done; the engine passes it
as allowed): the rounds already run do not depend on how many follow, so continuing a finished
10-round run to 20 rounds gives the 20-round run's adapters exactly. Not for strategies whose
schedule depends on the round budget (``rounds_extendable = False``: oneshot, whose steps are scaled
by it, and fedit_ft, whose fine-tuning round comes after it), nor with differential privacy (whose
noise is calibrated to the total): there it is checked like any other field.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from mira.errors import MiraError

NOT_RESULT = ("plots", "model.device")  # fields that change no number
FIXED = ("algorithm.name", "data.clients", "adapter.shapes")  # the checkpoint's state is made of these
BIG = 64 << 20


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (an empty section stays, as ``{}``)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= BIG:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        h.update(f.read(1 << 20))
        f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
    return f"{size} bytes, sha256 of the first and last MiB:{h.hexdigest()}"


def _files(path: str | None) -> dict[str, str]:
    """``{name: digest}`` for a local file, or for the regular files directly in a local folder."""
    if not path:
        return {}
    p = Path(os.path.expanduser(path))
    if p.is_file():
        return {p.name: file_digest(p)}
    if p.is_dir():
        return {f.name: file_digest(f) for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")}
    return {}


def _digest(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(resolved: dict, clients: Iterable, adapter_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The fingerprint of a run: ``resolved`` is the resolved config as a dict (``Engine.resolved_dict``),
    ``clients`` the workspace's ``ClientData``, ``adapter_shapes`` ``{tensor name: shape}``."""
    fp = {k: v for k, v in flatten(resolved).items()
          if not any(k == f or k.startswith(f + ".") for f in NOT_RESULT)}
    model, data = resolved.get("model") or {}, resolved.get("data") or {}
    for name, digest in _files(model.get("path")).items():
        fp[f"model.files[{name}]"] = digest
    for name, digest in _files(data.get("path")).items():
        fp[f"data.files[{name}]"] = digest
    clients = list(clients)
    fp["data.records"] = _digest([[c.id, c.task, *([r.to_dict() for r in part] for part in (c.train, c.val, c.test))]
                                  for c in clients])
    fp["data.clients"] = len(clients)
    fp["adapter.shapes"] = _digest(sorted((k, list(v)) for k, v in adapter_shapes.items()))
    return fp


def _show(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19] + "…"  # sha256: and 12 hex digits
    if isinstance(value, str) and ", sha256 of the first and last MiB:" in value:
        return value[:value.index(":") + 13] + "…"
    return json.dumps(value) if not isinstance(value, str) else value


def _matches(field: str, allowed: str) -> bool:
    return field == allowed or field.startswith(allowed + ".") or field.startswith(allowed + "[")


def check_allowed(allowed: Iterable[str], fields: Iterable[str]) -> None:
    """Each ``--allow-changed`` name is a fingerprint field or a section of some (``eval``, ``data.files``),
    and none of ``FIXED``."""
    fields = [*fields, "federation.rounds"]
    for name in allowed:
        if name in FIXED:
            raise MiraError(f"{name} cannot change on resume: the checkpoint holds state that only fits the "
                            "run it was made by (start a new run)", where="--allow-changed")
        if not any(_matches(f, name) for f in fields):
            raise MiraError(f"{name!r} is not a field of the run's fingerprint (e.g. eval.batch_size, "
                            "federation.lr, data.files)", where="--allow-changed")


def compare(stored: dict, current: dict, allowed: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """``(refused, accepted)``: the fields that differ, split by ``allowed`` (fields or sections; FIXED
    ones are never accepted)."""
    allowed = list(allowed)
    refused, accepted = [], []
    for field in list(stored) + [f for f in current if f not in stored]:
        was, now = stored.get(field, "(not set)"), current.get(field, "(not set)")
        if was == now:
            continue
        if field not in FIXED and any(_matches(field, a) for a in allowed):
            accepted.append(field)
        else:
            refused.append(field)
    return refused, accepted


def mismatch_message(run: Path, stored: dict, current: dict, refused: list[str]) -> str:
    field = refused[0]
    was, now = stored.get(field, "(not set)"), current.get(field, "(not set)")
    what = {"data.records": "the clients' records", "data.clients": "the number of clients",
            "adapter.shapes": "the adapter's shapes"}.get(field)
    if what:
        text = f"{run} was made with other data or adapters: {what} differ ({field}={_show(was)}, now {_show(now)})"
    elif field.startswith(("data.files[", "model.files[")):
        text = f"{run} was made with {field}={_show(was)}, the file now has {_show(now)}"
    else:
        text = f"{run} was made with {field}={_show(was)}, the config now says {_show(now)}"
    more = refused[1:]
    if more:
        text += f" (and {len(more)} more: {', '.join(more[:4])}{', …' if len(more) > 4 else ''})"
    hint = "edit it back, or start a new run"
    if field not in FIXED:
        hint += f"; if the change is safe, --allow-changed {field} accepts it"
    return f"{text} ({hint})"
