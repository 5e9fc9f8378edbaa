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
err_console = Console(stderr=True)


OLD_BUDGET_FLAG = ("--budget was removed: 1 meant one record and 1.0 every record; write --budget-records N "
                   "(a count) or --budget-fraction F (a share in (0, 1])")
OLD_EPOCHS_FLAG = ("--epochs was removed: ceil(epochs*|S|/batch) steps per v(S) made a proxy's value measure the steps "
                   "its removal took away; v(S) trains a fixed --steps on batches drawn from S")


def load_data(path: str, source: str, where: str = "DATA"):
    """Every record of ``path`` read by ``source``, unfiltered (records without text are reported, not dropped)."""
    from mira.config import DataConfig
    from mira.data.records import SOURCES

    if source not in SOURCES:
        raise MiraError(f"unknown data source {source!r}; choose one of {sorted(SOURCES)}", where="--source")
    cfg = DataConfig(source=source, path=path, max_per_task=None)
    try:
        return SOURCES[source]().load(cfg)
    except MiraError as e:  # the file is DATA (or --val-data) here, not data.path
        raise MiraError(e.message, where=where if e.where == "data.path" else e.where) from None


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
    budget_fraction: Optional[float] = typer.Option(None, "--budget-fraction", "-f",
                                                    help="keep this share of the candidates, in (0, 1] "
                                                         "[default: 0.1 when no budget is given]"),
    budget_records: Optional[int] = typer.Option(None, "--budget-records", "-n", help="keep this many records"),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", hidden=True),
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
                                             help="proxies added/removed at a time [default: clusters/10, rounded up]"),
    antithetic: bool = typer.Option(True, "--antithetic/--no-antithetic",
                                    help="permutations in pairs: a group order and its reverse"),
    center: bool = typer.Option(True, "--center/--no-center",
                                help="position control variate (see docs/shed.md)"),
    beta: float = typer.Option(1.0, "--beta", help="QWCS temperature: P(cluster) ~ exp(beta * value)"),
    standardize: bool = typer.Option(False, "--standardize",
                                     help="QWCS on z-scored values (beta in standard deviations)"),
    seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="share of DATA held out to score v(S)"),
    max_val: int = typer.Option(200, "--max-val", help="at most this many validation records"),
    val_data: Optional[str] = typer.Option(None, "--val-data",
                                           help="validation file (same --source) instead of holding out"),
    steps: int = typer.Option(10, "--steps", help="LoRA steps per v(S), the same for every coalition"),
    background: int = typer.Option(24, "--background",
                                   help="non-proxy records every v(S) also trains on (0: none, as the paper)"),
    proxy_size: int = typer.Option(1, "--proxy-size",
                                   help="records per cluster v(S) trains on: the proxy and the next nearest "
                                        "members (1: the paper's single proxy)"),
    epochs: Optional[str] = typer.Option(None, "--epochs", hidden=True),
    optimizer: str = typer.Option("sgd", "--optimizer", help="of the v(S) fine-tunes: sgd or adamw"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate of the v(S) fine-tunes "
                                                          "[default: 0.1 with sgd, 3e-3 with adamw]"),
    metric: str = typer.Option("neg_loss", "--metric", help="neg_loss or token_accuracy"),
    loss_weighting: str = typer.Option("token", "--loss-weighting",
                                       help="training loss of v(S): token (mean over tokens) or record "
                                            "(mean over records, each its mean token loss)"),
    embedder: str = typer.Option("all-MiniLM-L6-v2", "--embedder",
                                 help="sentence-transformers model (name or folder) or 'hashing'"),
    embed_fields: str = typer.Option("split", "--embed-fields",
                                     help="split: prompt and response embedded apart; example: as one text (paper)"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance",
                                              help="truncate a permutation once |v(S)-v(N)| < tol*|v(N)-v(empty)| "
                                                   "[default: the measured noise of one v(S)]"),
    train_seeds: str = typer.Option("fixed", "--train-seeds",
                                    help="v(S) training seed: fixed (one for all permutations) or per_unit "
                                         "(one per permutation pair)"),
    noise_seeds: int = typer.Option(2, "--noise-seeds",
                                    help="extra training seeds of v(N) to measure the noise of v(S)"),
    reliability_threshold: float = typer.Option(0.5, "--reliability-threshold",
                                                help="split-half rank correlation below which the values are noise"),
    max_length: int = typer.Option(128, "--max-length", help="tokens per example for v(S)"),
    template: str = typer.Option("auto", "--template", help="prompt template: auto, alpaca, compact, chat or a string"),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="write shed_values.png"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary (a noise warning still shows)"),
):
    """Refine an instruction data set with SHED (Shapley values of cluster proxies) to a budget."""
    from mira.report.progress import make_progress
    from mira.shed.refine import refine
    from mira.shed.report import write_outputs
    from mira.shed.settings import ShedSettings
    from mira.userfiles import check_out_file

    if budget is not None:
        raise MiraError(OLD_BUDGET_FLAG, where="--budget")
    if epochs is not None:
        raise MiraError(OLD_EPOCHS_FLAG, where="--epochs")
    if budget_fraction is not None and budget_records is not None:
        raise MiraError("give --budget-fraction or --budget-records, not both", where="--budget-fraction")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    raw: dict[str, Any] = {
        "budget_fraction": budget_fraction, "budget_records": budget_records, "strategy": strategy, "model": model,
        "clusters": clusters, "iterations": iterations, "group_size": group_size, "antithetic": antithetic,
        "center": center, "beta": beta, "standardize": standardize, "seed": seed, "val_fraction": val_fraction,
        "max_val": max_val, "steps": steps, "background": background, "proxy_size": proxy_size, "optimizer": optimizer, "lr": lr,
        "metric": metric, "loss_weighting": loss_weighting, "embedder": embedder,
        "embed_fields": embed_fields, "tolerance": tolerance,
        "noise_seeds": noise_seeds, "train_seeds": train_seeds, "reliability_threshold": reliability_threshold,
        "max_length": max_length,
        "template": template,
    }
    settings = ShedSettings.from_mapping(raw, flags=True)
    check_out_file(out)  # before the refinement, not when its result is written
    records = load_data(data, source)
    val = load_data(val_data, source, where="--val-data") if val_data else None
    with make_progress(quiet) as progress:
        bar = None if quiet else _Bar(progress.p)
        try:
            result = refine(records, settings, val_records=val, progress=bar, log=progress.log)
        except MiraError as e:  # a setting named as a field (e.g. model) is a flag here (--model)
            if e.where in ShedSettings.model_fields:
                raise MiraError(e.message, where="--" + e.where.replace("_", "-")) from None
            raise
        paths = write_outputs(result, out, plot=plot)
    rel = result.reliability
    if quiet:
        if rel is not None and not rel.reliable:
            err_console.print(f"warning: {rel.verdict}", soft_wrap=True, highlight=False)
        return
    sh = result.shapley
    t = Table(show_header=False,
              title=f"SHED {settings.strategy}: {len(result.records)} of {len(result.candidates)} records")
    t.add_column("")
    t.add_column("", justify="right")
    r = "n/a" if rel is None or rel.split_half is None else f"{rel.split_half:.2f}"
    for name, value in (("clusters", str(result.clustering.k)), ("v(empty)", f"{sh.v_empty:.4f}"),
                        ("v(all proxies)", f"{sh.v_full:.4f}"),
                        ("v(S) computed", str(rel.evaluations if rel else sh.evaluations)),
                        ("cache hits", str(rel.cache_hits if rel else sh.cache_hits)),
                        ("truncated groups", f"{sh.truncated_groups}/{sh.total_groups}"),
                        ("split-half r", r), ("wall time", f"{result.timings['total_s']:.1f}s")):
        t.add_row(name, value)
    console.print(t)
    if rel is not None:
        for line in rel.lines():
            console.print(line, soft_wrap=True, highlight=False,
                          style=None if rel.reliable or line != rel.verdict else "bold yellow")
    console.print("written: " + ", ".join(str(p) for p in paths.values()))


def register(app: typer.Typer) -> None:
    app.command("refine")(refine_cmd)
