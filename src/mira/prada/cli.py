"""``mira serve`` (the black-box provider) and ``mira proxy {build-models,shrink,train,generate}`` (the device)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mira.errors import MiraError

console = Console()
proxy_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                        help="Prada: adapt a black-box LLM with a private on-device proxy.")


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("MIRA_THREADS", "1")))


def _api_key(env: str) -> str:
    key = os.environ.get(env, "")
    if not key.strip():
        raise MiraError(f"set the server's API key in the environment variable {env}", where="--api-key-env")
    return key


# -- mira serve -----------------------------------------------------------------------------
def serve_cmd(model_dir: str = typer.Argument(..., help="Hugging Face model folder to serve"),
              port: int = typer.Option(8000, "--port", "-p"),
              host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on"),
              api_key_env: str = typer.Option("MIRA_API_KEY", "--api-key-env",
                                              help="environment variable holding the API key"),
              max_batch: int = typer.Option(16, "--max-batch", help="most prefixes per /v1/logits request"),
              max_draft: int = typer.Option(64, "--max-draft", help="largest n of a /v1/draft request"),
              max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes"),
              max_depth: int = typer.Option(8, "--max-depth", help="deepest JSON nesting accepted"),
              max_concurrent: int = typer.Option(4, "--max-concurrent",
                                                 help="requests in flight per API key (more get 429)"),
              body_timeout: float = typer.Option(2.0, "--body-timeout", help="seconds to receive a request body"),
              session_ttl: float = typer.Option(300.0, "--session-ttl", help="idle seconds before a session is dropped"),
              max_sessions: int = typer.Option(64, "--max-sessions", help="sessions kept in all"),
              max_sessions_per_key: int = typer.Option(8, "--max-sessions-per-key"),
              max_session_mb: float = typer.Option(512.0, "--max-session-mb",
                                                   help="MiB of KV cache for all sessions together"),
              dtype: str = typer.Option("float32", "--dtype")):
    """Serve a causal LM as a black box: next-token scores and drafts over HTTP, never weights."""
    from mira.prada.server import ServerLimits, serve

    limits = ServerLimits(max_batch=max_batch, max_draft=max_draft, max_body_bytes=max_body_bytes,
                          max_depth=max_depth, max_concurrent=max_concurrent, body_timeout=body_timeout,
                          session_ttl=session_ttl, max_sessions=max_sessions, max_sessions_per_key=max_sessions_per_key,
                          max_session_bytes=int(max_session_mb * (1 << 20)))
    serve(model_dir, host=host, port=port, key_env=api_key_env, limits=limits, dtype=dtype,
          log=lambda m: console.print(m, highlight=False))


# -- mira proxy build-models ----------------------------------------------------------------
@proxy_app.command("build-models")
def build_models_cmd(source: str = typer.Option(..., "--source", help="small pretrained Llama (e.g. stories260K)"),
                     stories: str = typer.Option(..., "--stories", help="TinyStories text file"),
                     dolly: str = typer.Option(..., "--dolly", help="databricks-dolly-15k.jsonl"),
                     out: Path = typer.Option(..., "--out", "-o"),
                     target_layers: int = typer.Option(10, "--target-layers"),
                     target_intermediate: int = typer.Option(344, "--target-intermediate"),
                     target_steps: int = typer.Option(200, "--target-steps"),
                     proxy_steps: int = typer.Option(100, "--proxy-steps"),
                     exclude_category: list[str] = typer.Option([], "--exclude-category",
                                                                help="Dolly category kept out of pre-training"),
                     seed: int = typer.Option(0, "--seed")):
    """Build the experiment's target (grown from SOURCE) and proxy (SOURCE), both briefly pre-trained."""
    from mira.prada.models import BuildSettings, PretrainSettings, build_models

    _threads()
    defaults = BuildSettings()
    settings = BuildSettings(target_layers=target_layers, target_intermediate=target_intermediate,
                             target=PretrainSettings(steps=target_steps, lr=defaults.target.lr),
                             proxy=PretrainSettings(steps=proxy_steps, lr=defaults.proxy.lr),
                             exclude_categories=tuple(exclude_category), seed=seed)
    report = build_models(source, stories, dolly, out, settings, log=lambda m: console.print(m, highlight=False))
    console.print(f"built {out}/target ({report['target']['parameters']:,} parameters) and {out}/proxy "
                  f"({report['proxy']['parameters']:,}) in {report['seconds']:.0f}s; report: {out}/build.json")


# -- mira proxy shrink ----------------------------------------------------------------------
def parse_layers(text: str | None) -> list[int] | None:
    """``'0-7,26-29'`` -> ``[0, ..., 7, 26, ..., 29]``; a one-line error for anything else."""
    if text is None:
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise MiraError(f"expected layer indices and ranges such as '0-7,26-29', got {text!r}",
                        where="--keep-layers") from None
    return layers


@proxy_app.command("shrink")
def shrink_cmd(source: str = typer.Option(..., "--source", help="a Llama folder or alias (e.g. smollm2-135m-instruct)"),
               out: Path = typer.Option(..., "--out", "-o", help="proxy folder to write"),
               keep_first: int = typer.Option(4, "--keep-first", help="keep this many of the first layers"),
               keep_last: int = typer.Option(1, "--keep-last", help="and this many of the last layers"),
               keep_layers: str | None = typer.Option(None, "--keep-layers",
                                                      help="source layers to keep, e.g. '0-7,26-29' "
                                                           "(instead of --keep-first/--keep-last)"),
               heal_distill: bool = typer.Option(False, "--heal-distill",
                                                 help="heal by distilling SOURCE (KL on every token) "
                                                      "instead of cross-entropy on the responses"),
               heal_dolly: str | None = typer.Option(None, "--heal-dolly",
                                                     help="databricks-dolly-15k.jsonl: heal the shrunk model on it"),
               heal_steps: int = typer.Option(60, "--heal-steps"),
               heal_lr: float = typer.Option(3e-4, "--heal-lr"),
               heal_batch: int = typer.Option(4, "--heal-batch"),
               heal_records: int = typer.Option(2000, "--heal-records", help="most Dolly records to heal on"),
               exclude_category: list[str] = typer.Option([], "--exclude-category",
                                                          help="Dolly category kept out of healing"),
               max_length: int = typer.Option(256, "--max-length"),
               seed: int = typer.Option(0, "--seed")):
    """Write a proxy that shares SOURCE's tokenizer: SOURCE with most of its layers dropped,
    optionally healed by a short full-parameter pass on public Dolly records."""
    from mira.prada.models import PretrainSettings, load_dolly, write_shrunk_proxy
    from mira.userfiles import check_out_folder

    _threads()
    check_out_folder(out)
    records = None
    if heal_dolly:
        records = load_dolly(heal_dolly, tuple(exclude_category))
        random.Random(seed).shuffle(records)
        records = records[:heal_records]
    report = write_shrunk_proxy(source, out, keep_first, keep_last, heal_records=records,
                                heal=PretrainSettings(steps=heal_steps, lr=heal_lr, batch_size=heal_batch),
                                max_length=max_length, seed=seed, log=lambda m: console.print(m, highlight=False),
                                distill=heal_distill, keep_layers=parse_layers(keep_layers))
    console.print(f"proxy written: {out} ({report['parameters']:,} parameters); report: {out}/shrink.json")


# -- mira proxy train -----------------------------------------------------------------------
@proxy_app.command("train")
def train_cmd(proxy: str = typer.Option(..., "--proxy", help="the proxy base model folder"),
              out: Path = typer.Option(..., "--out", "-o", help="adapter folder to write (PEFT format)"),
              source: str = typer.Option("json", "--source",
                                         help="json, dolly, gsm8k, natural_instructions or synthetic"),
              data: str | None = typer.Option(None, "--data", help="data file or folder"),
              task: list[str] = typer.Option([], "--task", help="keep only this task (repeatable)"),
              max_records: int | None = typer.Option(None, "--max-records", help="cap per task (seeded sample)"),
              steps: int = typer.Option(100, "--steps"),
              lr: float = typer.Option(1e-3, "--lr"),
              batch_size: int = typer.Option(8, "--batch-size"),
              rank: int = typer.Option(8, "--rank", "-r"),
              lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
              max_length: int = typer.Option(384, "--max-length"),
              seed: int = typer.Option(0, "--seed"),
              quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Fine-tune LoRA on the proxy from private data (mira's trainer); write a PEFT adapter."""
    from pydantic import ValidationError

    from mira.config import DataConfig
    from mira.data.records import load_records
    from mira.prada.train import AdapterTraining, train_adapter

    from mira.userfiles import check_out_folder

    _threads()
    check_out_folder(out)
    try:
        data_cfg = DataConfig(source=source, path=data, tasks=task or None, max_per_task=max_records,
                              max_length=max_length, seed=seed)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "data"
        flag = {"max_per_task": "--max-records", "path": "--data", "tasks": "--task"}.get(field, f"--{field.replace('_', '-')}")
        raise MiraError(err["msg"], where=flag) from None
    try:
        records = load_records(data_cfg, seed=seed)
    except MiraError as e:  # the file is --data here, not data.path
        raise MiraError(e.message, where={"data.path": "--data", "data.tasks": "--task"}.get(e.where, e.where)) from None
    settings = AdapterTraining(rank=rank, lora_alpha=lora_alpha, steps=steps, lr=lr, batch_size=batch_size,
                               max_length=max_length, seed=seed)
    trained = train_adapter(proxy, records, settings, out_dir=out,
                            log=None if quiet else lambda m: console.print(m, highlight=False))
    if not quiet:
        console.print(f"adapter written: {trained.path}")


# -- mira proxy generate --------------------------------------------------------------------
def _metrics_table(m: dict) -> Table:
    t = Table(title=f"{m['mode']}: {m['new_tokens']} tokens")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("round trips", f"{m['round_trips']}"), ("bytes sent", f"{m['bytes_sent']:,}"),
            ("bytes received", f"{m['bytes_received']:,}"), ("tokens / s", f"{m['tokens_per_second']:.1f}"),
            ("seconds (waiting for server)", f"{m['seconds']:.2f} ({m['server_seconds']:.2f})")]
    if m["acceptance_rate"] is not None:
        rows.append(("acceptance rate", f"{m['acceptance_rate']:.2f} ({m['accepted']}/{m['drafted']})"))
        rows.append(("near-ties re-asked (canonical)", f"{m.get('fallbacks', 0)}"))
    for r in rows:
        t.add_row(*r)
    return t


@proxy_app.command("generate")
def generate_cmd(server: str = typer.Option(..., "--server", help="URL of `mira serve`, e.g. http://127.0.0.1:8000"),
                 proxy: str = typer.Option(..., "--proxy", help="the proxy base model folder"),
                 adapter: str = typer.Option(..., "--adapter", help="the proxy's LoRA adapter (PEFT folder)"),
                 prompt: str = typer.Option(..., "--prompt", help="the instruction (or raw text with --template raw)"),
                 input_text: str = typer.Option("", "--input", help="optional context for the instruction"),
                 template: str = typer.Option("alpaca", "--template", help="alpaca or raw"),
                 mode: str = typer.Option("speculative", "--mode",
                                          help="per-token, speculative or session (speculative with a server session)"),
                 top_k: int | None = typer.Option(None, "--top-k", help="ask only for top-k log-probs"),
                 alpha: float = typer.Option(1.0, "--alpha", help="weight of the proxy's offset"),
                 max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
                 temperature: float = typer.Option(0.0, "--temperature", help="0: greedy"),
                 seed: int = typer.Option(0, "--seed", help="sampling seed"),
                 draft_initial: int = typer.Option(4, "--draft-initial"),
                 draft_min: int = typer.Option(1, "--draft-min"),
                 draft_max: int = typer.Option(16, "--draft-max"),
                 draft_rule: str = typer.Option("double", "--draft-rule",
                                                help="double (double/halve) or rate (from the acceptance rate)"),
                 exact_margin: float = typer.Option(1e-3, "--exact-margin",
                                                    help="speculative: re-ask positions decided closer than this"),
                 timeout: float = typer.Option(30.0, "--timeout", help="seconds per request"),
                 encoding: str = typer.Option("base64", "--encoding",
                                              help="base64 (float32), list, f16 or q8 (lossy, bounded)"),
                 api_key_env: str = typer.Option("MIRA_API_KEY", "--api-key-env"),
                 as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Generate with the remote model corrected by the proxy's offset; print the text and the traffic."""
    from mira.prada.client import BlackBoxClient
    from mira.prada.decoding import (
        DecodeSettings,
        DraftSchedule,
        make_decoder,
        prompt_ids,
    )
    from mira.prada.errors import PradaError
    from mira.prada.offset import ProxyPair

    _threads()
    if encoding not in ("base64", "list", "f16", "q8"):
        raise MiraError(f"encoding must be base64, list, f16 or q8, got {encoding!r}", where="--encoding")
    settings = DecodeSettings(max_new_tokens=max_new_tokens, alpha=alpha, top_k=top_k, temperature=temperature,
                              seed=seed, draft=DraftSchedule(draft_initial, draft_min, draft_max, draft_rule),
                              exact_margin=exact_margin)
    key = _api_key(api_key_env)
    pair, tokenizer = ProxyPair.load(proxy, adapter)
    with BlackBoxClient(server, key, timeout=timeout, encoding=encoding) as client:  # type: ignore[arg-type]
        health = client.health()
        if health.vocab_size != pair.vocab_size:
            raise MiraError(f"the server's vocabulary has {health.vocab_size} tokens, the proxy's {pair.vocab_size}; "
                            "they must share one tokenizer", where="--proxy")
        decoder = make_decoder(mode, client, pair, tokenizer, eos_ids=set(health.eos_token_ids) or None)
        ids = prompt_ids(tokenizer, prompt, input_text, template)
        try:
            gen = decoder.generate(ids, settings)
        except PradaError as e:
            if as_json:
                print(json.dumps({"error": str(e), "text": e.text, "token_ids": e.token_ids,
                                  "metrics": e.metrics.to_dict() if e.metrics else None}))
            raise
    if as_json:
        print(json.dumps(gen.to_dict()))
    else:
        console.print(gen.text, highlight=False, markup=False)
        console.print(_metrics_table(gen.metrics.to_dict()))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.add_typer(proxy_app, name="proxy")
