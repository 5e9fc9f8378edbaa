"""The ``mira`` command line.

Each capability contributes its commands through a ``register(app)`` function in its
own ``cli.py``; this file only wires them together and is the one error boundary of every
command:

* bad input is one line, ``error: <where>: <what>``, and exit code 2: a ``MiraError``
  (what the readers and validators raise, naming the file, line or field), a command-line
  usage error (a missing option, a value out of range; every float option must also be
  finite), and, as a safety net for a reader that let one through, an OS error on a named
  path, a decoding error, a pydantic validation error, an unreadable safetensors, YAML or
  JSON file;
* any other exception is a bug: the user gets one line (``error: internal error: <type>:
  <message> (traceback saved to <file>)``) and exit code 1; the traceback, without local
  variables (they may hold secrets), goes to a file under ``$MIRA_CACHE/crash/`` (or the
  temp folder). No Typer app prints locals either;
* Ctrl-C is ``aborted`` and exit code 130 (an ``EOFError`` is not Ctrl-C: click would
  report it as an abort, this boundary reports the error).
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import typer
from rich.console import Console

from mira.errors import MiraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="mira: federated and private adaptation of LLMs.")
err_console = Console(stderr=True)

# Modules that add commands to `app`. Each has a `register(app: typer.Typer)` function.
COMMAND_MODULES = [
    "mira.federated.cli",  # run, compare, demo
    "mira.data.cli",  # data inspect
    "mira.federated.flower.cli",
    "mira.shed.cli",
    "mira.prada.cli",
    "mira.merge.cli",
    "mira.glue.cli",
    "mira.models.cli",  # models list, models get
]


def _register_all() -> None:
    if getattr(app, "_mira_registered", False):  # once per app: again would add every command a second time
        return
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    app._mira_registered = True  # type: ignore[attr-defined]


_FINITE: dict[type, type] = {}


def _finite_type(kind):
    """``kind`` (a click float type, e.g. a ``FloatRange``) that also refuses ``nan`` and ``inf``."""
    cls = type(kind)
    if cls not in _FINITE:
        def convert(self, value, param, ctx):
            v = cls.convert(self, value, param, ctx)
            if isinstance(v, float) and not math.isfinite(v):
                self.fail(f"{value!r} is not a finite number", param, ctx)
            return v

        _FINITE[cls] = type(f"Finite{cls.__name__}", (cls,), {"convert": convert})
    finite = object.__new__(_FINITE[cls])
    finite.__dict__.update(kind.__dict__)
    return finite


def _command():
    """The click command of ``app``, every float option made finite-only."""
    import click

    root = typer.main.get_command(app)
    stack = [root]
    while stack:
        cmd = stack.pop()
        if isinstance(cmd, click.Group):
            stack.extend(cmd.commands.values())
        for param in cmd.params:
            if isinstance(param.type, click.types.FloatParamType) and type(param.type) not in _FINITE.values():
                param.type = _finite_type(param.type)
    return root


def _usage_line(e) -> str:
    """A click usage error as one line: what is wrong, then where to read the usage."""
    ctx = getattr(e, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return f"{e.format_message()}{hint}"


def expected_error(e: BaseException) -> str | None:
    """The one-line message for a failure that is the input's fault but reached the boundary without
    being a ``MiraError`` (a reader that should name the file did not), or None for a bug."""
    if isinstance(e, MiraError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, OSError) and e.filename:
        target = f" -> {e.filename2}" if e.filename2 else ""
        return f"{e.filename}{target}: {e.strerror or e}"
    kind = type(e)
    module = kind.__module__.split(".")[0]
    if module == "pydantic_core" and kind.__name__ == "ValidationError":
        err = e.errors()[0]  # type: ignore[attr-defined]
        field = ".".join(str(x) for x in err["loc"]) or e.title  # type: ignore[attr-defined]
        return f"{field}: {err['msg'].removeprefix('Value error, ')}"
    if kind.__name__ == "SafetensorError":
        return f"unreadable safetensors file (empty, truncated or corrupt): {e}"
    if module == "yaml" and kind.__name__.endswith("Error"):
        mark = getattr(e, "problem_mark", None)
        return f"malformed YAML{f' at line {mark.line + 1}' if mark else ''}: {getattr(e, 'problem', None) or e}"
    if kind.__name__ == "JSONDecodeError":
        return f"malformed JSON at line {e.lineno}: {e.msg}"  # type: ignore[attr-defined]
    return None


def _crash(e: BaseException) -> int:
    path = save_crash(e)
    saved = f"traceback saved to {path}" if path else "traceback could not be saved"
    _error(_one_line(f"internal error: {type(e).__name__}: {e} ({saved})"))
    return 1


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    err_console.print("[bold red]error:[/] ", end="", highlight=False)
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def save_crash(exc: BaseException) -> Path | None:
    """Write ``exc``'s traceback (no local variables) to ``$MIRA_CACHE/crash/`` or the temp folder."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    cache = Path(os.environ.get("MIRA_CACHE", Path.home() / ".cache" / "mira"))
    for folder in (cache / "crash", Path(tempfile.gettempdir()) / "mira-crash"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)  # not the command line: it may hold a secret
            return path
        except OSError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    import click

    _register_all()
    try:
        code = _command().main(args=argv, prog_name="mira", standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool):  # a typer.Exit's code; Ctrl-C is Exit(130)
            if code == 130:
                err_console.print("aborted")
            return code
    except MiraError as e:
        _error(_one_line(e))
        return 2
    except typer.Exit as e:  # pragma: no cover - raised by typer for --help etc.
        return e.exit_code
    except typer.Abort as e:
        cause = e.__cause__
        if isinstance(cause, EOFError):  # click turns an EOFError into an abort: it is an error, not Ctrl-C
            return _crash(cause)
        err_console.print("aborted")
        return 130
    except click.exceptions.ClickException as e:  # usage errors: one line too
        _error(_one_line(_usage_line(e)))
        return 2
    except Exception as e:
        message = expected_error(e)
        if message is not None:
            _error(_one_line(message))
            return 2
        return _crash(e)
    return 0


def entrypoint() -> None:
    sys.exit(main())
