"""The ``mira`` command line.

Each capability contributes its commands through a ``register(app)`` function in its
own ``cli.py``; this file only wires them together and turns ``MiraError`` into a
one-line message with exit code 2.
"""
from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from mira.errors import MiraError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mira: federated and private adaptation of LLMs.")
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


def main(argv: list[str] | None = None) -> int:
    _register_all()
    try:
        app(args=argv, standalone_mode=False)
    except MiraError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as e:  # pragma: no cover - raised by typer for --help etc.
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        raise
    return 0


def entrypoint() -> None:
    sys.exit(main())
