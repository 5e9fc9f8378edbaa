"""Each client's splits under the length policy, what it did, and examples as the model sees them.

``tokenize_clients`` tokenises every client's train, test and validation split with the run's
template and length policy; ``check_clients`` refuses what ``mira run`` cannot train on.
``client_reports`` gives one row per client (train and test together): examples before and
after, dropped, truncated, prompts kept whole, and token-length percentiles. The same rows go
to the run log, to ``summary.json`` (``data``, see ``data_summary``) and to ``mira data inspect``.
"""
from __future__ import annotations

from mira.data.prompts import (IGNORE, LengthStats, TokenizedDataset, check_client_stats, get_template,
                               tokenizer_from_config)
from mira.errors import MiraError


def tokenize_clients(clients, tokenizer, data_cfg, check: bool = True):
    """``(train, test, val, rows)``: each client's tokenised splits (``val`` is empty when no client
    has a validation split) and its report rows. With ``check`` a client that cannot be trained on
    is an error (``check_clients``); ``mira data inspect`` checks after printing its table."""
    tok = tokenizer_from_config(data_cfg, tokenizer)
    train = [tok(c.train) for c in clients]
    test = [tok(c.test) for c in clients]
    val = [tok(c.val) for c in clients] if any(getattr(c, "val", None) for c in clients) else []
    if check:
        check_clients(clients, train, test, val, data_cfg)
    return train, test, val, client_reports(clients, train, test)


def check_clients(clients, train: list[TokenizedDataset], test: list[TokenizedDataset], val: list[TokenizedDataset],
                  data_cfg) -> None:
    """A client that would lose more than half of its examples (``check_client_stats``) or that has no
    training, test or (when asked for) validation example left is an error naming it."""
    for c, tr, te in zip(clients, train, test):
        check_client_stats(c.id, c.task, tr.stats.merge(te.stats), data_cfg)
        if not len(tr) or not len(te):
            raise MiraError(f"client {c.id} (task {c.task!r}) has no {'training' if not len(tr) else 'test'} example "
                            f"left after the length policy; raise data.max_length", where="data.max_length")
    for c, v in zip(clients, val):
        if not len(v):
            raise MiraError(f"client {c.id} (task {c.task!r}) has no validation example left after the length "
                            f"policy; raise data.max_length or partition.val_fraction", where="partition.val_fraction")


def data_summary(rows: list[dict], data_cfg, tokenizer) -> dict:
    """The ``data`` section of ``summary.json`` (and ``mira data inspect --json``)."""
    return {"template": get_template(data_cfg.template, tokenizer).name, "overflow": data_cfg.overflow,
            "max_length": data_cfg.max_length, **totals(rows), "clients": rows}


def client_reports(clients, train: list[TokenizedDataset], test: list[TokenizedDataset]) -> list[dict]:
    rows = []
    for c, tr, te in zip(clients, train, test):
        st: LengthStats = tr.stats.merge(te.stats)
        rows.append({"client": c.id, "task": c.task, **st.to_dict(),
                     "train": {"before": tr.stats.before, "after": tr.stats.after},
                     "test": {"before": te.stats.before, "after": te.stats.after}})
    return rows


def totals(rows: list[dict]) -> dict:
    before = sum(r["before"] for r in rows)
    intact = sum(r["prompt_intact"] for r in rows)
    return {"before": before, "after": sum(r["after"] for r in rows), "dropped": sum(r["dropped"] for r in rows),
            "input_truncated": sum(r["input_truncated"] for r in rows),
            "response_truncated": sum(r["response_truncated"] for r in rows),
            "prompt_intact": intact, "prompt_intact_fraction": intact / before if before else 1.0}


def report_table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("client", "task", "before", "after", "dropped", "input cut", "resp. cut", "prompt whole",
                "prompt tokens p50/p90/max", "response tokens p50/p90/max"):
        t.add_column(col, justify="left" if col == "task" else "right")

    def pct(d: dict) -> str:
        return f"{d.get('p50', 0)}/{d.get('p90', 0)}/{d.get('max', 0)}" if d else "-"

    for r in rows:
        t.add_row(str(r["client"]), r["task"], str(r["before"]), str(r["after"]), str(r["dropped"]),
                  str(r["input_truncated"]), str(r["response_truncated"]), f"{100 * r['prompt_intact_fraction']:.1f}%",
                  pct(r["prompt_tokens"]), pct(r["response_tokens"]))
    tot = totals(rows)
    t.add_row("all", "", str(tot["before"]), str(tot["after"]), str(tot["dropped"]), str(tot["input_truncated"]),
              str(tot["response_truncated"]), f"{100 * tot['prompt_intact_fraction']:.1f}%", "", "", style="bold")
    return t


def log_lines(rows: list[dict]) -> list[str]:
    tot = totals(rows)
    out = [f"data: {tot['after']}/{tot['before']} examples kept, {tot['dropped']} dropped, "
           f"{tot['input_truncated']} inputs cut, {tot['response_truncated']} responses cut; "
           f"prompts whole: {100 * tot['prompt_intact_fraction']:.1f}%"]
    for r in rows:
        out.append(f"  client {r['client']} ({r['task']}): {r['after']}/{r['before']} kept, {r['dropped']} dropped, "
                   f"{r['input_truncated'] + r['response_truncated']} truncated; prompt tokens p50/p90 {r['prompt_tokens'].get('p50', 0)}/"
                   f"{r['prompt_tokens'].get('p90', 0)}, response p50/p90 {r['response_tokens'].get('p50', 0)}/"
                   f"{r['response_tokens'].get('p90', 0)}")
    return out


def render_example(ds: TokenizedDataset, i: int, tokenizer):
    """A rich ``Text``: the masked prompt (no loss) dim, the response (the loss) in green, each decoded
    from exactly the ids the model gets, special tokens included."""
    from rich.text import Text

    ids, labels = ds.input_ids[i], ds.labels[i]
    n_prompt = sum(1 for t in labels if t == IGNORE)
    prompt = tokenizer.decode(ids[:n_prompt], skip_special_tokens=False)
    response = tokenizer.decode(ids[n_prompt:], skip_special_tokens=False)
    text = Text()
    text.append(f"── masked prompt, no loss ({n_prompt} tokens) ──\n", style="bold")
    text.append(prompt, style="dim")
    text.append(f"\n── response, in the loss ({len(ids) - n_prompt} tokens) ──\n", style="bold")
    text.append(response, style="green")
    return text
