"""ClientApp: train the received global adapter on this node's partition and reply."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_nlp import faults
from flowertune_nlp.comm import cast_record
from flowertune_nlp.config import build_config
from flowertune_nlp.logs import use_flower_log_handlers
from flowertune_nlp.nodes import describe_node
from flowertune_nlp.training import train_round

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (see nodes.py)."""
    return Message(content=describe_node(context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    use_flower_log_handlers()
    config = build_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])  # the server checked the count
    settings = msg.content.config_records["config"]
    server_round = int(settings["server-round"])
    fault = faults.client_fault(config.faults, partition_id, server_round)
    faults.before_training(fault, partition_id, server_round)
    result = train_round(
        config,
        partition_id=partition_id,
        server_round=server_round,
        learning_rate=float(settings["lr"]),
        global_state=msg.content.array_records["arrays"].to_torch_state_dict(),
    )
    metrics = MetricRecord({
        "train_loss": result.train_loss,
        "num-examples": result.num_examples,
        "examples-dropped": result.dropped,
        "seconds": result.seconds,
        "train-seconds": result.train_seconds,
    })
    content = RecordDict({
        "arrays": cast_record(ArrayRecord(faults.corrupt_reply(fault, result.state)),
                              config.comm.transport),
        "metrics": metrics,
        "info": ConfigRecord({"precision": result.precision}),
    })
    return Message(content=content, reply_to=msg)
