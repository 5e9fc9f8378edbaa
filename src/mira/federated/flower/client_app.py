"""mira's Flower ``ClientApp``: answers the three message types of ``protocol``.

Training is ``mira.federated.client.client_fit``, the very function the in-process
engine calls; this module only moves records in and out. Imports are lazy: Flower
starts one ClientApp process per message and ``hello`` should stay light.
"""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


def _setup(context: Context):
    from mira.federated.flower.node import node_spec, run_config_of

    return run_config_of(context.run_config), node_spec(context.node_config)


@app.query("mira_hello")
def hello(msg: Message, context: Context) -> Message:
    from mira.federated.flower.node import hello_info
    from mira.federated.flower.protocol import hello_reply

    cfg, spec = _setup(context)
    return Message(hello_reply(hello_info(cfg, spec)), reply_to=msg)


@app.train("mira_fit")
def fit(msg: Message, context: Context) -> Message:
    from mira.federated.flower.node import NodeRuntime
    from mira.federated.flower.protocol import fit_reply, parse_fit

    cfg, spec = _setup(context)
    task = parse_fit(msg.content)
    buf, metrics = NodeRuntime(cfg, spec).fit(task)
    return Message(fit_reply(buf, metrics), reply_to=msg)


@app.evaluate("mira_eval")
def evaluate(msg: Message, context: Context) -> Message:
    from mira.federated.flower.node import NodeRuntime
    from mira.federated.flower.protocol import eval_reply, parse_eval

    cfg, spec = _setup(context)
    bufs, own, _ = parse_eval(msg.content)
    losses, tokens, extra = NodeRuntime(cfg, spec).evaluate(bufs, own)
    return Message(eval_reply(losses, tokens, extra), reply_to=msg)
