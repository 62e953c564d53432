"""PyTorch side of fedbucket (needs the ``torch`` extra: ``pip install 'fedbucket[torch]'``).

- :mod:`.task` — the task package: a user's models, data, training recipe and evaluation;
- :mod:`.training` — load global weights, the default local training recipe (FedProx), evaluate;
- :mod:`.digits` and :mod:`.zoo` — the built-in digits task and its models (``mlp``, ``cnn``);
- :mod:`.participate` — the long-running client loop behind ``fedbucket participate``.
"""

from fedbucket.torch.task import Examples, Task, build_model, load_task
from fedbucket.torch.training import (
    ProximalTerm,
    evaluate,
    load_global_weights,
    run_epochs,
    state_dict_to_numpy,
    train_local,
)

__all__ = [
    "Examples",
    "ProximalTerm",
    "Task",
    "build_model",
    "evaluate",
    "load_global_weights",
    "load_task",
    "run_epochs",
    "state_dict_to_numpy",
    "train_local",
]
