"""quickstart: a Flower / PyTorch ClientApp; FedBAT trains and packs the reply."""

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedbat_flwr.client
from quickstart.task import Net, load_data
from quickstart.task import test as test_fn

app = ClientApp()
device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _load_data(context: Context):
    """This node's train and held-out loaders."""
    node, run = context.node_config, context.run_config
    partition = node["partition-id"], node["num-partitions"]
    return load_data(*partition, run["batch-size"], run["max-examples-per-node"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on local data; the reply is FedBAT's 1-bit update."""
    trainloader, _ = _load_data(context)
    # Was: load the weights, train_fn(...), reply with the state_dict (options: msg config).
    return fedbat_flwr.client.train(Net(), trainloader, msg, context=context, device=device)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the node's held-out data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testloader = _load_data(context)
    eval_loss, eval_acc = test_fn(model, testloader, device)
    n = len(testloader.dataset)
    metrics = {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": n}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
