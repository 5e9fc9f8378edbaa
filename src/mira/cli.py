"""The ``mira`` command line.

Each capability contributes its commands through a ``register(app)`` function in its
own ``cli.py``; this file only wires them together and turns ``MiraError`` into a
one-line message with exit code 2. Any other exception is a bug: the user gets one line
(``error: internal error: <type>: <message> (traceback saved to <file>)``) and exit code 1;
the traceback, without local variables (they may hold secrets), goes to a file under
``$MIRA_CACHE/crash/`` (or the temp folder). No Typer app prints locals either.
"""
from __future__ import annotations

import importlib
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
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


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
    _register_all()
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool):  # a typer.Exit's code; Ctrl-C is Exit(130)
            if code == 130:
                err_console.print("aborted")
            return code
    except MiraError as e:
        _error(_one_line(e))
        return 2
    except typer.Exit as e:  # pragma: no cover - raised by typer for --help etc.
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as e:  # click usage errors, else a bug
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        path = save_crash(e)
        saved = f"traceback saved to {path}" if path else "traceback could not be saved"
        _error(_one_line(f"internal error: {type(e).__name__}: {e} ({saved})"))
        return 1
    return 0


def entrypoint() -> None:
    sys.exit(main())
