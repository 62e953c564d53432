"""Bring your own model: a complete fedbucket client. Copy it and replace the data and the model.

    python examples/bring_your_own_model.py --bucket file:///tmp/federation --client-id my-org

Your model's state-dict names and shapes must be the federation's (here the zoo's ``mlp``).
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from fedbucket import Client


def my_model() -> nn.Module:  # same layers, so the same names and shapes, as the zoo's "mlp"
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--client-id", required=True)
    args = parser.parse_args()
    digits = load_digits()  # your private data goes here; it never leaves this process
    x, y = torch.tensor(digits.data / 16, dtype=torch.float32), torch.tensor(digits.target)
    model = my_model()
    with Client(args.bucket, args.client_id) as client:
        task = client.wait_for_round(timeout=600)
        model.load_state_dict(client.fetch_model(task))  # 1. start from the global model
        optimiser = torch.optim.SGD(model.parameters(), lr=task.training.learning_rate)
        for _ in range(task.training.local_epochs):  # 2. your own training loop
            for i in range(0, len(x), task.training.batch_size):
                optimiser.zero_grad()
                loss = nn.functional.cross_entropy(
                    model(x[i : i + task.training.batch_size]), y[i : i + task.training.batch_size]
                )
                loss.backward()
                optimiser.step()
        manifest = client.submit(task, model.state_dict(), num_examples=len(x), metrics={"loss": loss.item()})  # 3.
        print(f"submitted {manifest.sha256[:12]}… for round {task.round_id}")


if __name__ == "__main__":
    main()
