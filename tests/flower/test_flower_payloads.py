"""Adapters travel as Flower-native named tensors (``protocol``): one ``Array`` per LoRA tensor
in an ``ArrayRecord``, keyed by its name, at ``federation.wire_dtype``; a node refuses tensors that
do not fit its model. In-process, over mira's real ClientApp (``test_secagg.MemoryGrid``: every
message deflated to Flower's objects and inflated again, as on a link)."""
from __future__ import annotations

import math

import pytest

from .conftest import N_CLIENTS, flower_cfg, read_json
from .test_secagg import MemoryGrid


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)


class RecordingGrid(MemoryGrid):
    """``MemoryGrid`` that keeps every message it was given and every reply."""

    def __init__(self, run_config: dict, n: int):
        super().__init__(run_config, n)
        self.sent, self.got = [], []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += messages
        ids = super().push_messages(messages)
        self.got += [self.replies[i] for i in ids]
        return ids


def _template(raw: dict) -> dict:
    from mira.config import validate
    from mira.federated.flower.node import load_slot

    _, slot = load_slot(validate(raw))
    return {k: tuple(slot.initial_state[k].shape) for k in slot.keys()}


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_fit_messages_hold_one_named_array_per_adapter_key(task_identity, tmp_path, wire_dtype):
    from flwr.app import ArrayRecord

    from mira.federated.flower import bundle
    from mira.federated.flower.protocol import BF16_STYPE, MSG_EVAL, MSG_FIT, NUMPY_STYPE
    from mira.federated.flower.server import run_server
    from mira.federated.flower.settings import RunSettings

    raw = flower_cfg(federation={"rounds": 1, "wire_dtype": wire_dtype}, eval={"every": 1})
    shapes = _template(raw)
    rc = {"mira-config": bundle.config_text(raw), **RunSettings(out_dir=str(tmp_path / "run"), poll=0.01).to_run_config()}
    grid = RecordingGrid(rc, N_CLIENTS)
    run_server(grid, rc)

    fits = [(m, r) for m, r in zip(grid.sent, grid.got) if m.metadata.message_type == MSG_FIT]
    assert len(fits) == N_CLIENTS
    stype = BF16_STYPE if wire_dtype == "bfloat16" else NUMPY_STYPE
    for msg, rep in fits:
        assert not rep.has_error(), rep.error
        for rec in (msg.content["adapter"], rep.content["adapter"]):  # down and up: the same layout
            assert isinstance(rec, ArrayRecord) and list(rec) == list(shapes)
            for k, arr in rec.items():
                assert (arr.dtype, tuple(arr.shape), arr.stype) == (wire_dtype, shapes[k], stype), k
                assert len(arr.data) >= 2 * math.prod(shapes[k])
        assert msg.content["fit"]["wire_dtype"] == wire_dtype
        if wire_dtype == "float16":  # Flower's own API reads them as the tensors they are
            assert [a.shape for a in rep.content["adapter"].to_numpy_ndarrays()] == list(shapes.values())
    evals = [m for m in grid.sent if m.metadata.message_type == MSG_EVAL]
    assert evals and all(m.content["adapter_0"]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
                         .dtype == "float32" for m in evals)  # evaluation: float32, lossless
    s = read_json(tmp_path / "run" / "summary.json")
    raw_bytes = s["adapter_bytes"] // 2  # the float32 tensor bytes, at 16 bits
    assert s["bytes_down"] == s["bytes_up"] == N_CLIENTS * (16 + raw_bytes)  # the engine's accounting


def test_a_node_refuses_an_adapter_that_does_not_fit_its_model(task_identity):
    """The node checks the key set and the shapes against its own model and LoRA config, and
    says which key differs (here the server's LoRA would be rank 8, the node's rank 4)."""
    import torch
    from flwr.app import Context, Message, RecordDict

    from mira.federated.flower import bundle
    from mira.federated.flower.client_app import app
    from mira.federated.flower.protocol import MSG_FIT, FitTask, PayloadError, TensorCodec, fit_content

    raw = flower_cfg()
    shapes = _template(raw)
    keys = list(shapes)
    wrong = {k: torch.zeros(8, s[1]) if "lora_A" in k else torch.zeros(s[0], 8) for k, s in shapes.items()}
    ctx = Context(run_id=1, node_id=100, state=RecordDict(), run_config={"mira-config": bundle.config_text(raw)},
                  node_config={"partition-id": 0, "num-partitions": N_CLIENTS})

    def send(state, ks):  # the task says "all keys" (keys=[]); the tensors are ``ks``
        content = fit_content(FitTask(TensorCodec(state, "float32").encode(state, ks), 1, 0))
        return app(Message(content, dst_node_id=100, message_type=MSG_FIT), ctx)

    with pytest.raises(PayloadError, match=r"lora_A.weight: shape \(8, \d+\) on the wire, \(4, \d+\) in this side"):
        send(wrong, keys)
    with pytest.raises(PayloadError, match="1 expected here are missing"):
        send({k: torch.zeros(s) for k, s in shapes.items()}, keys[:-1])  # one key short


def test_flowers_own_clipping_mod_acts_on_mira_fit_messages(task_identity):
    """The payloads are what Flower's mods expect (one ``ArrayRecord`` and one ``ConfigRecord``
    down, one ``ArrayRecord`` with the same keys up): Flower's ``fixedclipping_mod`` (central DP
    with client-side clipping), wrapped around mira's real ClientApp, clips the trained update to
    the norm the server put into the fit config, and leaves its direction as it was."""
    import numpy as np
    import torch
    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp.mod import fixedclipping_mod

    from mira.federated.flower import bundle
    from mira.federated.flower.client_app import app
    from mira.federated.flower.protocol import MSG_FIT, FitTask, TensorCodec, fit_content, parse_fit_reply

    raw = flower_cfg(federation={"lr": 0.05})
    shapes = _template(raw)
    torch.manual_seed(0)
    state = {k: 0.02 * torch.randn(s) for k, s in shapes.items()}
    ctx = Context(run_id=1, node_id=100, state=RecordDict(), run_config={"mira-config": bundle.config_text(raw)},
                  node_config={"partition-id": 0, "num-partitions": N_CLIENTS})

    def message(clip=None):
        content = fit_content(FitTask(TensorCodec(state, "float32").encode(state, list(shapes)), 1, 0))
        if clip is not None:
            content["fit"]["clipping_norm"] = float(clip)
        return Message(content, dst_node_id=100, message_type=MSG_FIT)

    sent = np.concatenate([state[k].numpy().ravel() for k in shapes])

    def update(reply):
        assert not reply.has_error(), reply.error
        t, _ = parse_fit_reply(reply.content)
        return np.concatenate([t.arrays[k].astype(np.float64).ravel() for k in shapes]) - sent

    free = update(app(message(), ctx))  # no mod: the update as trained
    norm = float(np.linalg.norm(free))
    assert norm > 0
    clipped = update(fixedclipping_mod(message(clip=norm / 4), ctx, app))
    assert np.linalg.norm(clipped) == pytest.approx(norm / 4, rel=1e-4)
    np.testing.assert_allclose(clipped, free / 4, rtol=1e-3, atol=1e-7)  # same training, same direction
