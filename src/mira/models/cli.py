"""``mira models list`` and ``mira models get ALIAS``: the named base models of ``mira.models.registry``."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

models_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                         help="Named base models (use an alias as model.path).")


def register(app: typer.Typer) -> None:
    """Add the ``models`` sub-command group to ``app``."""
    app.add_typer(models_app, name="models")


def _fmt_params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e6:.2f}M"


@models_app.command("list")
def list_command() -> None:
    """List the model aliases, what each is, its size and whether it is cached (and where)."""
    from mira.models.registry import MODELS, model_source

    table = Table(title=f"model aliases (MIRA_MODEL_SOURCE={model_source()})")
    for col in ("alias", "what it is", "parameters", "cached", "folder"):
        table.add_column(col, justify="right" if col == "parameters" else "left", overflow="fold")
    for alias in sorted(MODELS):
        e = MODELS[alias]
        folder = e.folder()
        table.add_row(alias, e.description, _fmt_params(e.parameters), "yes" if e.is_cached() else "no",
                      str(folder) if folder else "")
    Console(width=200).print(table)


@models_app.command("get")
def get_command(alias: str = typer.Argument(..., help="A model alias (see `mira models list`).")) -> None:
    """Fetch ALIAS if it is not cached yet and print its folder (or Hub id) on stdout."""
    from mira.models.registry import get, stderr_log

    typer.echo(get(alias, where="ALIAS").ensure(stderr_log))
