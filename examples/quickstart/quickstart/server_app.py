"""quickstart: a Flower / PyTorch ServerApp with FedBAT as its strategy."""

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedbat_flwr import FedBATStrategy
from quickstart.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train Net with FedBAT; the clients evaluate each round's global model."""
    config = context.run_config
    num_rounds: int = config["num-server-rounds"]
    arrays = ArrayRecord(Net().state_dict())

    # Was: FedAvg(fraction_train=...). The clients' options travel in every train message.
    strategy = FedBATStrategy(
        arrays,
        fraction_train=config["fraction-train"],
        lr=config["lr"],
        local_epochs=config["local-epochs"],
        batch_size=config["batch-size"],
    )
    result = strategy.start(
        grid=grid, initial_arrays=strategy.initial_arrays, num_rounds=num_rounds
    )

    torch.save(result.arrays.to_torch_state_dict(), config["final-model"])
    accuracy = result.evaluate_metrics_clientapp[num_rounds]["eval_acc"]
    print(f"quickstart: round {num_rounds} federated accuracy {accuracy:.4f}", flush=True)
    print(f"quickstart: final model saved to {config['final-model']}", flush=True)
