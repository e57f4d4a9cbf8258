"""ClientApp: say what data this node serves; train the received global adapter on the source
the server assigned, or score it on that source's held-back rows, and reply."""

from __future__ import annotations

import logging
import zlib

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_nlp import faults
from flowertune_nlp import messages as wire
from flowertune_nlp.comm import cast_record
from flowertune_nlp.config import AppConfig, build_config
from flowertune_nlp.logs import use_flower_log_handlers
from flowertune_nlp.nodes import (
    DATA_PATH_KEY,
    Source,
    assigned_source,
    data_errors_without_paths,
    describe_node,
)
from flowertune_nlp.privacy import client_clipping_mod
from flowertune_nlp.warm_nodes import warm_node

# No torch at import: on a warm node this process only forwards to the node's worker
# (warm_nodes.py), and the training modules are imported where the work is done.
app = ClientApp(mods=[client_clipping_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's name and the data it serves (see nodes.py); on a warm node,
    start its worker now, so that its imports and model load overlap the server's next steps."""
    if node := warm_node(context):
        try:
            node.prestart(context.run_config)
        except Exception as err:  # the train message reports it, as a counted failure
            use_flower_log_handlers()
            logging.getLogger(__name__).warning("could not start the warm worker: %s", err)
    use_flower_log_handlers()  # a data problem's full text goes to this node's log
    return Message(content=describe_node(context), reply_to=msg)


def _assignment(msg: Message, context: Context) -> tuple[AppConfig, ConfigRecord, Source]:
    """The run's config, the message's settings and the source it assigns to this node."""
    use_flower_log_handlers()
    config = build_config(context.run_config)
    settings = msg.content.config_records[wire.CONFIG]
    return config, settings, assigned_source(context, settings, config.dataset.num_partitions)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if node := warm_node(context):
        return node.forward(msg, context)
    config, settings, source = _assignment(msg, context)
    server_round = int(settings[wire.SERVER_ROUND])
    fault = faults.client_fault(config.faults, source.partition, server_round)
    faults.before_training(fault, source.label, server_round)
    from flowertune_nlp.training import train_round

    global_state = msg.content.array_records[wire.ARRAYS].to_torch_state_dict()
    with data_errors_without_paths():
        result = train_round(
            config,
            source,
            server_round=server_round,
            learning_rate=float(settings[wire.LEARNING_RATE]),
            global_state=global_state,
            data_path=context.node_config.get(DATA_PATH_KEY),
            proximal_mu=float(settings.get(wire.PROXIMAL_MU, 0.0)),
        )
    metrics = MetricRecord({
        wire.TRAIN_LOSS: result.train_loss,
        wire.NUM_EXAMPLES: result.num_examples,
        wire.EXAMPLES_DROPPED: result.dropped,
        wire.SECONDS: result.seconds,
        wire.TRAIN_SECONDS: result.train_seconds,
    })
    seed = zlib.crc32(f"{config.seed}:{server_round}:{source.label}".encode())
    state = faults.reply_state(fault, result.state, global_state, seed)
    content = RecordDict({
        wire.ARRAYS: cast_record(ArrayRecord(state), config.comm.transport),
        wire.METRICS: metrics,
        wire.INFO: ConfigRecord({wire.PRECISION: result.precision, wire.SOURCE: source.label}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global adapter's loss on this source's held-back rows."""
    if node := warm_node(context):
        return node.forward(msg, context)
    from flowertune_nlp.training import evaluate_round

    config, _, source = _assignment(msg, context)
    with data_errors_without_paths():
        result = evaluate_round(config, source,
                                msg.content.array_records[wire.ARRAYS].to_torch_state_dict(),
                                data_path=context.node_config.get(DATA_PATH_KEY))
    metrics = MetricRecord({wire.EVAL_LOSS: result.loss, wire.EVAL_TOKENS: result.tokens,
                            wire.NUM_EXAMPLES: result.num_examples,
                            wire.SECONDS: result.seconds})
    return Message(content=RecordDict({wire.METRICS: metrics}), reply_to=msg)
