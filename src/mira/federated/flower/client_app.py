"""mira's Flower ``ClientApp``: answers the three message types of ``protocol``, and the plain
``train`` messages of Flower's SecAgg+ workflow (``secagg_fit``, with ``secaggplus_mod``).

Training is ``mira.federated.client.client_fit`` (through ``NodeRuntime.fit``), the very
function the in-process engine calls; this module only moves records in and out.
Flower starts one ClientApp process per message, so imports are lazy. With a warm
node worker (node config ``worker=<socket>``, see ``worker``) the same ``NodeRuntime``
code runs in the worker, which keeps the model loaded between messages.
"""
from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


def _log(context: Context, what: str, t0: float, warm: bool) -> None:
    pid = context.node_config.get("partition-id", "?")
    print(f"[mira client {pid} {time.strftime('%H:%M:%S')}] {what} in {time.perf_counter() - t0:.1f}s ({'warm worker' if warm else 'cold'})",
          flush=True)


def _worker(context: Context, kind: str, **payload) -> dict | None:
    """Forward to the node's warm worker, if it has one."""
    address = context.node_config.get("worker")
    if not address:
        return None
    from mira.federated.flower.worker import call

    return call(str(address), {"kind": kind, "mira_config": context.run_config.get("mira-config", ""),
                               "node_config": dict(context.node_config), **payload})


def _runtime(context: Context):
    from mira.federated.flower.node import NodeRuntime, node_spec, run_config_of

    return NodeRuntime(run_config_of(context.run_config), node_spec(context.node_config))


@app.query("mira_hello")
def hello(msg: Message, context: Context) -> Message:
    from mira.federated.flower.protocol import hello_reply

    t0 = time.perf_counter()
    answer = _worker(context, "hello")
    if answer is None:
        from mira.federated.flower.node import hello_info, node_spec, run_config_of

        info = hello_info(run_config_of(context.run_config), node_spec(context.node_config))
    else:
        info = answer["info"]
    _log(context, "hello", t0, answer is not None)
    return Message(hello_reply(info), reply_to=msg)


@app.train("mira_fit")
def fit(msg: Message, context: Context) -> Message:
    from mira.federated.flower.protocol import fit_reply, parse_fit, task_fields

    t0 = time.perf_counter()
    task = parse_fit(msg.content)
    answer = _worker(context, "fit", task=task_fields(task))
    if answer is None:
        tensors, metrics = _runtime(context).fit(task)
    else:  # the worker's answer keeps its historical key names ("buf", "bufs"): the values are Tensors
        tensors, metrics = answer["buf"], answer["metrics"]
    _log(context, f"fit round {task.rnd}", t0, answer is not None)
    return Message(fit_reply(tensors, metrics), reply_to=msg)


def _secaggplus(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod``, imported on first use."""
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


@app.train(mods=[_secaggplus])
def secagg_fit(msg: Message, context: Context) -> Message:
    """A round under SecAgg+ (``privacy.secure_aggregation``; see ``secagg``): Flower's
    ``SecAggPlusWorkflow`` sends plain ``train`` messages; ``secaggplus_mod`` answers its key
    stages itself and calls this only in the masked-vector stage, with a legacy ``FitIns``. The
    reply is a legacy ``FitRes``, which the mod quantises and masks before it leaves the node."""
    from mira.federated.flower.protocol import task_fields
    from mira.federated.flower.secagg import legacy_fit_reply, parse_legacy_fit

    t0 = time.perf_counter()
    task, arrays, cfg = parse_legacy_fit(msg.content)
    answer = _worker(context, "fit_arrays", task=task_fields(task), arrays=arrays)
    if answer is None:
        new, metrics = _runtime(context).fit_arrays(task, arrays)
    else:
        new, metrics = answer["arrays"], answer["metrics"]
    _log(context, f"fit round {task.rnd} (SecAgg+)", t0, answer is not None)
    return Message(legacy_fit_reply(new, metrics, cfg), reply_to=msg)


@app.evaluate("mira_eval")
def evaluate(msg: Message, context: Context) -> Message:
    from mira.federated.flower.protocol import eval_reply, parse_eval

    t0 = time.perf_counter()
    adapters, own, rnd = parse_eval(msg.content)
    answer = _worker(context, "eval", bufs=adapters, own=own)
    if answer is None:
        losses, tokens, extra = _runtime(context).evaluate(adapters, own)
    else:
        losses, tokens, extra = answer["losses"], answer["tokens"], answer["extra"]
    _log(context, f"evaluate round {rnd}", t0, answer is not None)
    return Message(eval_reply(losses, tokens, extra), reply_to=msg)
