"""The names both sides of a Message agree on; the one module ClientApp and ServerApp share."""

ARRAYS_KEY = "arrays"  # a train message's downlink / a reply's payload (ArrayRecord)
METRICS_KEY = "metrics"  # a reply's scalar metrics (MetricRecord)
NUM_EXAMPLES_KEY = "num-examples"  # the weight of a reply, in METRICS_KEY
NODE_INFO_KEY = "node-info"  # a query reply: what a node says about itself (MetricRecord)
PARTITION_ID_KEY = "partition-id"  # in NODE_INFO_KEY: the partition the node trains on
