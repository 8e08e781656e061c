"""fedcifar_app: federated CIFAR-10 with Flower and PyTorch.

Where each concern lives (the README's "Project layout" has the full tree):
config (the run config), data (datasets, decode cache, partitions), model, training
(Flower-free loops), client_app / server_app (the two Flower apps), strategy (the hooks any
Flower strategy gets here), metrics (one round's row), results (the run folder), files
(atomic writes), plots, compat (the few Flower internals we touch), deploy (SuperLink and
SuperNodes), centralized (the non-federated baseline).
"""

__version__ = "1.1.0"
