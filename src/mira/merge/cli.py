"""``mira merge RECIPE.yaml --out DIR``: merge models or LoRA adapters from a recipe.

Errors in the recipe or the inputs are raised as ``MiraError``; ``mira.cli.main`` prints
them as one line and exits with code 2.
"""
from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

DEFAULT_SHARD_MB = 1024.0  # mirrors mira.merge.engine.DEFAULT_SHARD_MB; torch is imported only when a merge runs


def register(app: typer.Typer) -> None:
    """Add the ``merge`` command to ``app``."""
    app.command("merge")(merge_command)


def merge_command(
    recipe: Path = typer.Argument(..., help="Merge recipe (YAML): merge_method, models, base_model, dtype, "
                                            "parameters."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (a Hugging Face model or a PEFT adapter)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists and is not empty."),
    shard_size: float = typer.Option(DEFAULT_SHARD_MB, "--shard-size", min=1.0,
                                     help="Largest output shard of a full model, in MB."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge models or LoRA adapters as RECIPE describes.

    RECIPE is a YAML file with merge_method (linear, task_arithmetic, ties, dare, dare_linear, dare_ties, slerp),
    models, base_model, dtype and parameters; see docs/merge.md.
    """
    from mira.merge.engine import merge

    console = Console(stderr=True)
    notes = _NoteHandler(console)  # the merger's info lines (e.g. which DARE rescaling runs); warnings come below
    log = logging.getLogger("mira.merge")
    level = log.level
    if not quiet:
        log.addHandler(notes)
        log.setLevel(logging.INFO)
    try:
        with Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=quiet) as bar:
            task = bar.add_task("merge", total=None)

            def advance(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total)

            result = merge(recipe, out, overwrite=overwrite, max_shard_mb=shard_size, progress=advance)
    finally:
        log.removeHandler(notes)
        log.setLevel(level)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    what = "PEFT adapter" if result.kind == "adapter" else "Hugging Face model"
    typer.echo(f"{result.method}: merged {result.num_models} inputs into a {what} at {result.out_dir} "
               f"({result.num_tensors} tensors, {result.num_bytes / 2**20:.1f} MB in {len(result.files)} "
               f"file(s), {result.seconds:.1f} s)")


class _NoteHandler(logging.Handler):
    """Prints ``mira.merge``'s INFO records as ``note: ...`` lines on the (progress-aware) console."""

    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:  # warnings are printed from the result, once
            self.console.print(f"note: {record.getMessage()}", markup=False, highlight=False, soft_wrap=True)
