"""fedcifar_app: federated CIFAR-10 with Flower and PyTorch.

Where each concern lives (docs/architecture.md has the full map):

- client/   what runs on a node: the ClientApp entry, a node's job for one message, torch threads
- server/   what runs in the ServerApp: the entry, the run, the data check, this app's hooks on any
            Flower strategy, building the strategy, the privacy accountant, stopping
- runs/     the run folder: files, checkpoint, recorder, status.json, run.log, metrics, plots,
            TensorBoard scalars, fedcifar-compare
- data/     datasets, the decode-once cache, partitions, one node's splits
- deploy/   fedcifar-deploy: SuperLink and SuperNodes on one or several machines
- the core beside them: config (the run config, validated once), errors (every error a user can act
  on), model, training (Flower-free loops), files (atomic writes), pyproject (pyproject.toml and
  --run-config text), compat (the Flower internals we touch), procfs, logs, seeds, centralized
"""


def __getattr__(name: str) -> str:
    """``__version__``: pyproject.toml's [project] version, the one source, read from the installed
    metadata when asked. Not at import: importlib.metadata costs ~25 ms to import, which the warm
    start's shim (client/warm/shim.py) and every ClientApp would otherwise pay for each message."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedcifar-app")
    except PackageNotFoundError:  # running from a FAB or a source tree that pip did not install
        return "unknown"
