"""``mira glue ZOO.yaml --out DIR``: from a zoo of models or adapters to one strong model.

Errors in the zoo file or its inputs are raised as ``MiraError``; ``mira.cli.main`` prints
them as one line and exits with code 2.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console



def register(app: typer.Typer) -> None:
    """Add the ``glue`` command to ``app``."""
    app.command("glue")(glue_command)


def glue_command(
    zoo: Path = typer.Argument(..., help="Zoo file (YAML): members or run, base_model, validation, test, "
                                         "cluster, strategy, mixture; see docs/glue.md."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (cluster merges, router, glue.json/.md/.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists and is not empty."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
) -> None:
    """Cluster the zoo, merge each cluster selectively, mix the merges with a router, and report."""
    console = Console(stderr=True)
    from mira.glue.pipeline import run_glue

    result = run_glue(zoo, out, overwrite=overwrite,
                      log=(lambda s: None) if quiet else (lambda s: console.print(s, highlight=False)))
    best = next(e for e in result["entries"] if e["name"] == result["best_single"])
    final = next(e for e in result["entries"] if e["name"] == result["final"])
    typer.echo(f"glue: {len(result['zoo']['members'])} members -> {len(result['clusters'])} cluster(s); "
               f"best single {best['name']} val loss {best['val_mean_loss']:.4f}; "
               f"final {final['name']} val loss {final['val_mean_loss']:.4f}; report in {out}/glue.md")
