"""fedcifar_app: federated CIFAR-10 with Flower and PyTorch.

Where each concern lives (the README's "Project layout" has the full tree):
config (the run config), data (datasets, decode cache, partitions), model, training
(Flower-free loops), client_app / server_app (the two thin Flower apps; they import no torch),
node_job / server_run (what each does, imported when a run starts), strategy (the hooks any
Flower strategy gets here), strategies (run config -> Flower strategy and DP wrapper), privacy
(the epsilon accountant), metrics (one round's row), results (the run folder), files (atomic
writes), plots, board (TensorBoard scalars), compare (runs side by side), compat (the few Flower
internals we touch), deploy (SuperLink and SuperNodes), centralized (the non-federated baseline).
"""

__version__ = "1.1.0"
