"""``mira refine``: SHED data refinement of one data file."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mira.errors import MiraError

console = Console()


def parse_budget(text: str) -> int | float:
    """``"0.1"`` -> 0.1 (a fraction), ``"200"`` -> 200 (a count); ``MiraError`` otherwise."""
    text = text.strip()
    try:
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise MiraError(f"expected a fraction in (0, 1] or a record count, got {text!r}", where="--budget") from None


def load_data(path: str, source: str, where: str = "DATA"):
    """Every record of ``path`` read by ``source``, unfiltered (records without text are reported, not dropped)."""
    from mira.config import DataConfig
    from mira.data.records import SOURCES

    if source not in SOURCES:
        raise MiraError(f"unknown data source {source!r}; choose one of {sorted(SOURCES)}", where="--source")
    cfg = DataConfig(source=source, path=path, max_per_task=None)
    try:
        return SOURCES[source]().load(cfg)
    except MiraError as e:
        where = where if e.where == "data.path" else e.where
        raise MiraError(str(e).removeprefix("data.path: "), where=where) from None


class _Bar:
    """A rich progress bar with ETA over the Shapley group steps."""

    def __init__(self, progress):
        self.progress = progress
        self.task = None

    def __call__(self, advance: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("Shapley v(S)", total=total)
        self.progress.advance(self.task, advance)


def refine_cmd(
    data: str = typer.Argument(..., help="data file (JSON/JSONL, or a folder for natural_instructions)"),
    budget: str = typer.Option("0.1", "--budget", "-b",
                               help="fraction in (0, 1] (e.g. 0.1) or a record count (e.g. 500)"),
    strategy: str = typer.Option("qocs", "--strategy", "-s", help="qocs or qwcs"),
    out: Path = typer.Option(Path("refined.jsonl"), "--out", "-o",
                             help="refined JSONL; shed.json and shed_values.png go next to it"),
    source: str = typer.Option("json", "--source", help="json, dolly, natural_instructions, gsm8k, ..."),
    model: str = typer.Option("builtin:demo", "--model", "-m",
                              help="proxy model for v(S): builtin:demo or a model folder "
                                   "(e.g. $MIRA_ASSETS/models/stories260K)"),
    clusters: Optional[int] = typer.Option(None, "--clusters", "-k", help="k-means clusters [default: ~records/33]"),
    iterations: int = typer.Option(10, "--iterations", help="Monte-Carlo permutations"),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="proxies removed at a time [default: ~clusters/50]"),
    beta: float = typer.Option(1.0, "--beta", help="QWCS temperature: P(cluster) ~ exp(beta * value)"),
    standardize: bool = typer.Option(False, "--standardize",
                                     help="QWCS on z-scored values (beta in standard deviations)"),
    seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="share of DATA held out to score v(S)"),
    val_data: Optional[str] = typer.Option(None, "--val-data",
                                           help="validation file (same --source) instead of holding out"),
    steps: int = typer.Option(20, "--steps", help="LoRA steps per v(S)"),
    epochs: Optional[float] = typer.Option(None, "--epochs",
                                           help="instead of --steps: passes over S per v(S) (paper: 3)"),
    metric: str = typer.Option("neg_loss", "--metric", help="neg_loss or token_accuracy"),
    embedder: str = typer.Option("all-MiniLM-L6-v2", "--embedder",
                                 help="sentence-transformers model (name or folder) or 'hashing'"),
    tolerance: float = typer.Option(0.01, "--tolerance",
                                    help="truncate an iteration once |v(S)-v(empty)| <= tol*|v(N)-v(empty)|"),
    max_length: int = typer.Option(128, "--max-length", help="tokens per example for v(S)"),
    template: str = typer.Option("auto", "--template", help="prompt template: auto, alpaca, compact, chat or a string"),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="write shed_values.png"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary"),
):
    """Refine an instruction data set with SHED (Shapley values of cluster proxies) to a budget."""
    from mira.report.progress import make_progress
    from mira.shed.refine import refine
    from mira.shed.report import write_outputs
    from mira.shed.settings import ShedSettings

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    raw: dict[str, Any] = {
        "budget": parse_budget(budget), "strategy": strategy, "model": model, "clusters": clusters,
        "iterations": iterations, "group_size": group_size, "beta": beta, "standardize": standardize, "seed": seed,
        "val_fraction": val_fraction, "steps": steps, "epochs": epochs, "metric": metric, "embedder": embedder,
        "tolerance": tolerance, "max_length": max_length, "template": template,
    }
    settings = ShedSettings.from_mapping(raw, flags=True)
    records = load_data(data, source)
    val = load_data(val_data, source, where="--val-data") if val_data else None
    with make_progress(quiet) as progress:
        bar = None if quiet else _Bar(progress.p)
        result = refine(records, settings, val_records=val, progress=bar, log=progress.log)
        paths = write_outputs(result, out, plot=plot)
    if quiet:
        return
    sh = result.shapley
    t = Table(title=f"SHED {settings.strategy}: {len(result.records)} of {len(result.candidates)} records")
    for col in ("clusters", "v(empty)", "v(all proxies)", "v(S) computed", "cache hits", "truncated", "time"):
        t.add_column(col, justify="right")
    t.add_row(str(result.clustering.k), f"{sh.v_empty:.4f}", f"{sh.v_full:.4f}", str(sh.evaluations),
              str(sh.cache_hits), f"{sh.truncated_groups}/{sh.total_groups}", f"{result.timings['total_s']:.1f}s")
    console.print(t)
    console.print("written: " + ", ".join(str(p) for p in paths.values()))


def register(app: typer.Typer) -> None:
    app.command("refine")(refine_cmd)
