"""What the length policy did to each client, and examples rendered exactly as the model sees them.

``client_reports`` gives one row per client (train and test together): examples before and
after, dropped, truncated, prompts kept whole, and token-length percentiles. The same rows go
to the run log, to ``summary.json`` (``data``) and to ``mira data inspect``.
"""
from __future__ import annotations

from mira.data.prompts import IGNORE, LengthStats, TokenizedDataset


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
