"""ClientApp: say what data this node serves; train the received global adapter on the source
the server assigned and reply."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_nlp import faults
from flowertune_nlp import messages as wire
from flowertune_nlp.comm import cast_record
from flowertune_nlp.config import build_config
from flowertune_nlp.logs import use_flower_log_handlers
from flowertune_nlp.nodes import DATA_PATH_KEY, assigned_source, describe_node
from flowertune_nlp.training import train_round

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's name and the data it serves (see nodes.py)."""
    return Message(content=describe_node(context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    use_flower_log_handlers()
    config = build_config(context.run_config)
    settings = msg.content.config_records[wire.CONFIG]
    source = assigned_source(context, settings, config.dataset.num_partitions)
    server_round = int(settings[wire.SERVER_ROUND])
    fault = faults.client_fault(config.faults, source.partition, server_round)
    faults.before_training(fault, source.label, server_round)
    result = train_round(
        config,
        source,
        server_round=server_round,
        learning_rate=float(settings[wire.LEARNING_RATE]),
        global_state=msg.content.array_records[wire.ARRAYS].to_torch_state_dict(),
        data_path=context.node_config.get(DATA_PATH_KEY),
    )
    metrics = MetricRecord({
        wire.TRAIN_LOSS: result.train_loss,
        wire.NUM_EXAMPLES: result.num_examples,
        wire.EXAMPLES_DROPPED: result.dropped,
        wire.SECONDS: result.seconds,
        wire.TRAIN_SECONDS: result.train_seconds,
    })
    content = RecordDict({
        wire.ARRAYS: cast_record(ArrayRecord(faults.corrupt_reply(fault, result.state)),
                                config.comm.transport),
        wire.METRICS: metrics,
        wire.INFO: ConfigRecord({wire.PRECISION: result.precision, wire.SOURCE: source.label}),
    })
    return Message(content=content, reply_to=msg)
