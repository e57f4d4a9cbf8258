"""Names shared by the ClientApp and the ServerApp: the records of a train message and its reply,
and the keys inside them. One spelling per quantity, Flower's kebab-case on the wire
("num-examples" is also the key Flower's FedAvg weights replies by). The snake_case names in
metrics.jsonl are the server's own row keys, not wire keys."""

from __future__ import annotations

# Records of a train message (server -> client) and of its reply (client -> server).
ARRAYS = "arrays"  # ArrayRecord: the global adapter sent, the trained adapter replied
CONFIG = "config"  # ConfigRecord of the train message: round settings
METRICS = "metrics"  # MetricRecord of the reply
INFO = "info"  # ConfigRecord of the reply: text that is not averaged

# Keys of the CONFIG record (partition keys live in nodes.py with the node config).
SERVER_ROUND = "server-round"
LEARNING_RATE = "lr"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
PRIVACY_MODE = "privacy-mode"  # which of Flower's clipping mods the client applies, if any

# Keys of the METRICS record.
TRAIN_LOSS = "train-loss"
NUM_EXAMPLES = "num-examples"
AGGREGATION_WEIGHT = "aggregation-weight"  # set by the server: the rules' weighting key
EXAMPLES_DROPPED = "examples-dropped"
SECONDS = "seconds"
TRAIN_SECONDS = "train-seconds"

# Keys of the METRICS record of an evaluate reply (with NUM_EXAMPLES).
EVAL_LOSS = "eval-loss"
EVAL_TOKENS = "eval-tokens"

# Keys of the INFO record.
PRECISION = "precision"
SOURCE = "source"

# How a failure's reason starts when a node's own data cannot be used; the rest classifies the
# problem without any path (data.NodeDataError.reason), since the server logs and records it.
DATA_FAILURE = "node data unusable"
