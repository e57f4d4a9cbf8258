"""Messages built in the test, as Flower's own strategy tests build them: a grid whose nodes
answer queries from their node config, and train replies carrying a LoRA-shaped adapter."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flowertune_nlp import messages as wire
from flowertune_nlp.nodes import describe_node


@pytest.fixture(autouse=True)
def task_identity():
    """Messages read the run id of the process they are built in, as Flower's runtime sets."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class FakeGrid:
    """A grid whose nodes answer queries with what their node config says; records pushes."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.node_configs = node_configs
        self.queries = 0

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.queries += 1
            message.metadata.__dict__["_message_id"] = f"q{self.queries}"
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config=self.node_configs[node],
                              state=RecordDict(), run_config={})
            reply = Message(content=describe_node(context), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def adapter_reply(message: Message, state: dict[str, torch.Tensor], examples: int,
                  loss: float = 1.0) -> Message:
    """A successful train reply carrying `state`."""
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(state),
        wire.METRICS: MetricRecord({wire.TRAIN_LOSS: loss, wire.NUM_EXAMPLES: examples,
                                    wire.EXAMPLES_DROPPED: 0, wire.SECONDS: 1.0,
                                    wire.TRAIN_SECONDS: 1.0}),
        wire.INFO: ConfigRecord({wire.PRECISION: "cpu, dense base, fp32 compute"}),
    })
    return Message(content=content, reply_to=message)


def train_reply(message: Message, value: float, examples: int) -> Message:
    """A train reply whose lora_A entries all equal `value` (and whose loss is `value`)."""
    state = {"a.lora_A.weight": torch.full((2, 3), value), "a.lora_B.weight": torch.zeros(3, 2)}
    return adapter_reply(message, state, examples, loss=value)


def push(messages):
    """Give messages the ids a grid sets when it pushes them."""
    for i, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"m{i}"
    return messages
