"""``mira run``, ``mira compare`` and ``mira demo``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from mira.errors import MiraError

console = Console()

ALL_ALGORITHMS = "local,fedit,fedprox,ffa_lora,mira,centralized"


def _setup(quiet: bool) -> None:
    import torch

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))


def _summary_table(title: str, rows: list[tuple]) -> Table:
    t = Table(title=title)
    for col in ("algorithm", "mean local loss", "mean global loss", "bytes up", "bytes down"):
        t.add_column(col, justify="right" if col != "algorithm" else "left")
    for r in rows:
        t.add_row(*r)
    return t


def _fmt(e: dict, key: str) -> str:
    std = e.get(f"{key}_std")
    return f"{e[key]:.4f}" + (f" ± {std:.4f}" if std else "")


def run_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config (default: the embedded demo config)"),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory"),
            set_: List[str] = typer.Option([], "--set", help="override a config field, e.g. federation.rounds=5"),
            resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory"),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars")):
    """Run one federated algorithm and write a run directory."""
    from mira.config import load_config
    from mira.federated.engine import Engine, Workspace
    from mira.report.progress import make_progress

    _setup(quiet)
    if resume is not None:
        if not (resume / "config.yaml").exists():
            raise MiraError(f"{resume} is not a mira run directory (no config.yaml)", where="--resume")
        cfg, _ = load_config(resume / "config.yaml", set_)
        out = resume
    else:
        cfg, _ = load_config(config, set_)
        out = out or Path("runs") / cfg.algorithm.name
    with make_progress(quiet) as progress:
        ws = Workspace.load(cfg, progress.log)
        summary = Engine(ws, cfg, out, quiet).run(resume=resume is not None, progress=progress)
    if not quiet:
        console.print(_summary_table(f"{cfg.algorithm.name} after {summary['rounds']} rounds", [
            (summary["algorithm"], f"{summary['mean_local_test_loss']:.4f}", f"{summary['mean_global_test_loss']:.4f}",
             f"{summary['bytes_up']:,}", f"{summary['bytes_down']:,}")]))
        console.print(f"run directory: {out}")


def compare_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config (default: the embedded demo config)"),
                algorithms: str = typer.Option(ALL_ALGORITHMS, "--algorithms", "-a",
                                               help="comma-separated; options after a colon, e.g. mira:graph=similarity"),
                out: Path = typer.Option(Path("runs/compare"), "--out", "-o"),
                seeds: str = typer.Option("0", "--seeds", help="comma-separated seeds, e.g. 0,1,2"),
                set_: List[str] = typer.Option([], "--set"),
                quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Run several algorithms on identical data, model and seeds; write comparison.{json,md,png}."""
    from mira.config import load_config
    from mira.federated.compare import compare
    from mira.report.progress import make_progress

    _setup(quiet)
    cfg, _ = load_config(config, set_)
    specs = _split_specs(algorithms)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise MiraError(f"seeds must be integers, got {seeds!r}", where="--seeds") from None
    with make_progress(quiet) as progress:
        result = compare(cfg, specs, out, seed_list, progress, progress.log)
    _print_comparison(result, out, quiet)


def _split_specs(text: str) -> list[str]:
    """Split on commas that are not inside an option list (``mira:graph=x,lambda=1`` stays whole)."""
    specs: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if specs and ":" in specs[-1] and "=" in part and ":" not in part:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def _print_comparison(result: dict, out: Path, quiet: bool) -> None:
    if quiet:
        return
    rows = [(label, _fmt(e, "mean_local_test_loss"), _fmt(e, "mean_global_test_loss"), f"{int(e['bytes_up']):,}",
             f"{int(e['bytes_down']):,}") for label, e in result["algorithms"].items()]
    console.print(_summary_table("comparison", rows))
    console.print(f"written: {out}/comparison.json, comparison.md, comparison.png, loss_curves.png")


def demo_cmd(out: Path = typer.Option(Path("runs/demo"), "--out", "-o"),
             quiet: bool = typer.Option(False, "--quiet", "-q")):
    """The embedded default end to end: mira's own 8-task suite and demo model, all algorithms."""
    from mira.config import load_config
    from mira.federated.compare import compare
    from mira.report.progress import make_progress

    _setup(quiet)
    cfg, _ = load_config(None)
    specs = ALL_ALGORITHMS.split(",") + ["mira:graph=similarity"]
    with make_progress(quiet) as progress:
        progress.log("data: mira's synthetic 8-task suite (add/sub, reverse chars/words, upper/lower, sort digits/letters)")
        progress.log("model: builtin:demo, a 3-layer Llama that mira builds and pre-trains on first use (cached)")
        result = compare(cfg, specs, out, [cfg.seed], progress, progress.log)
    _print_comparison(result, out, quiet)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("compare")(compare_cmd)
    app.command("demo")(demo_cmd)
