"""PyTorch helpers and the model zoo (needs the ``torch`` extra: ``pip install 'fedbucket[torch]'``).

- :mod:`.training` — load global weights, train locally (optionally with FedProx), evaluate;
- :mod:`.zoo` — models by name (``mlp``, ``cnn``) or ``package.module:callable``.
"""

from fedbucket.torch.training import ProximalTerm, evaluate, load_global_weights, state_dict_to_numpy, train_local
from fedbucket.torch.zoo import ZOO, build_model

__all__ = [
    "ZOO",
    "ProximalTerm",
    "build_model",
    "evaluate",
    "load_global_weights",
    "state_dict_to_numpy",
    "train_local",
]
