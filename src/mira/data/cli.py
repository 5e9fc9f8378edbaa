"""``mira data inspect CONFIG``: what the template and the length policy do to each client, in seconds.

Loads the records, the partition and the tokenizer (no training), prints the per-client table
(examples before/after, dropped, truncated, prompts kept whole, token-length percentiles) and a
few examples per client rendered exactly as the model sees them, with the masked prompt shown
apart from the response that carries the loss. A client that would lose more than half of its
examples is reported in the table and then is an error (exit 2), as ``mira run`` would refuse it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for the whole table
    console = Console(width=160)
data_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                       help="Look at a config's data before training.")


@data_app.command("inspect")
def inspect_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config (default: the embedded demo config)"),
                set_: List[str] = typer.Option([], "--set", help="override a config field, e.g. data.max_length=256"),
                examples: int = typer.Option(3, "--examples", "-n", min=0, help="rendered examples per client"),
                as_json: bool = typer.Option(False, "--json", help="print the table as JSON (no examples)")):
    """Per-client length report and rendered examples (masked prompt shown), without training."""
    from mira.config import load_config
    from mira.data.partition import partition
    from mira.data.records import load_records
    from mira.data.report import check_clients, data_summary, render_example, report_table, tokenize_clients
    from mira.models.loader import load_tokenizer

    cfg, _ = load_config(config, set_)
    records = load_records(cfg.data, seed=cfg.data.seed)
    clients = partition(records, cfg.partition, seed=cfg.seed, min_train=1)
    tokenizer = load_tokenizer(cfg.model.path)
    train, test, val, rows = tokenize_clients(clients, tokenizer, cfg.data, check=False)
    summary = data_summary(rows, cfg.data, tokenizer)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        title = (f"{config or 'embedded default'}: template {summary['template']}, max_length {cfg.data.max_length}, "
                 f"overflow {cfg.data.overflow}")
        console.print(report_table(rows, title))
        for c, ds in zip(clients, train):
            for i in range(min(examples, len(ds))):
                console.rule(f"client {c.id} ({c.task}), training example {i + 1}")
                console.print(render_example(ds, i, tokenizer), highlight=False, markup=False)
    check_clients(clients, train, test, val, cfg.data)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
