"""Tiny target/proxy models with one tokenizer, a trained proxy adapter, and real server processes.

Everything is built in a temp dir once per session: a BPE tokenizer trained on the synthetic
suite, a 2-layer target and a smaller 1-layer proxy (both random Llamas from a config), a
JSONL data file, and a LoRA adapter trained on it with ``mira proxy train``. Servers run
``mira serve`` (through ``mira.cli.main``) in a subprocess on 127.0.0.1 and a free port;
every process started here is killed in a ``finally``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import typer

import mira.cli

os.environ["MIRA_THREADS"] = "1"
torch.set_num_threads(1)

API_KEY = "prada-test-key"
CONTEXT = 112  # the target's context window (small, so that tests can run into it)
LAUNCH = ("import sys, mira.cli as c; c.COMMAND_MODULES = ['mira.prada.cli']; "
          "raise SystemExit(c.main(sys.argv[1:]))")


@dataclass
class Zoo:
    root: Path
    target: Path
    proxy: Path
    data: Path
    adapter: Path


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv: int, seed: int, init: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=False, initializer_range=init, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def cli(monkeypatch):
    """``mira.cli.main`` with only the prada commands (on a fresh app)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)

    @app.callback()
    def root() -> None:
        """mira"""

    monkeypatch.setattr(mira.cli, "app", app)
    monkeypatch.setattr(mira.cli, "COMMAND_MODULES", ["mira.prada.cli"])
    return mira.cli.main


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    from mira.data.prompts import MARKER, format_prompt
    from mira.data.synthetic import generate_suite
    from mira.models.demo import build_tokenizer

    root = tmp_path_factory.mktemp("prada")
    records = generate_suite(30, seed=5, tasks=["reverse_words", "upper", "sort_letters"])
    tok = build_tokenizer([format_prompt(r) + MARKER + r.output for r in records], vocab_size=200)
    for name, (hidden, layers, heads, kv, init) in {"target": (32, 2, 4, 2, 0.08), "proxy": (16, 1, 2, 1, 0.08)}.items():
        model = _llama(len(tok), hidden, layers, heads, kv, seed=len(name), init=init)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "private.jsonl"
    data.write_text("".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output}) + "\n"
                            for r in records))
    zoo = Zoo(root, root / "target", root / "proxy", data, root / "adapter")
    app = typer.Typer(add_completion=False)
    app.callback()(lambda: None)
    saved = mira.cli.app, mira.cli.COMMAND_MODULES
    mira.cli.app, mira.cli.COMMAND_MODULES = app, ["mira.prada.cli"]
    try:
        rc = mira.cli.main(["proxy", "train", "--proxy", str(zoo.proxy), "--source", "json", "--data", str(data),
                            "--out", str(zoo.adapter), "--steps", "40", "--lr", "0.02", "--rank", "4",
                            "--batch-size", "8", "--max-length", "96", "-q"])
    finally:
        mira.cli.app, mira.cli.COMMAND_MODULES = saved
    assert rc == 0
    return zoo


# -- server processes ---------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir: Path, log: Path, *args: str) -> Iterator[Server]:
    """``mira serve MODEL_DIR`` on a free port; waits for ``/health``; always killed at the end."""
    port = free_port()
    env = {**os.environ, "MIRA_API_KEY": API_KEY, "MIRA_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", str(model_dir), "--host", "127.0.0.1",
                                 "--port", str(port), *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after 180s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(zoo, tmp_path_factory) -> Iterator[Server]:
    """One server for the target, shared by the tests that do not break it."""
    with running_server(zoo.target, tmp_path_factory.mktemp("logs") / "server.log", "--max-draft", "32",
                        "--max-batch", "4", "--body-timeout", "0.5") as s:
        yield s


@pytest.fixture
def own_server(zoo, tmp_path) -> Iterator[Server]:
    """A server of this test's own (to kill or freeze)."""
    with running_server(zoo.target, tmp_path / "server.log") as s:
        yield s


@pytest.fixture(scope="session")
def device(zoo):
    """``(ProxyPair, tokenizer)``: the proxy with its trained adapter."""
    from mira.prada.offset import ProxyPair

    return ProxyPair.load(str(zoo.proxy), str(zoo.adapter))


@pytest.fixture(scope="session")
def pair(device):
    return device[0]


@pytest.fixture(scope="session")
def tokenizer(device):
    return device[1]


@pytest.fixture
def client(server):
    from mira.prada.client import BlackBoxClient

    with BlackBoxClient(server.url, API_KEY, timeout=20) as c:
        yield c


PROMPTS = [("Reverse the order of the words.", "cat dog sun"), ("Convert the word to upper case.", "stone"),
           ("Sort the letters of the word alphabetically.", "river"), ("Write a story about a robot.", "")]


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    from mira.prada.decoding import prompt_ids

    return [prompt_ids(tokenizer, p, i) for p, i in PROMPTS]
