"""What runs in the ServerApp process: the entry (app.py, torch-free at import), the run (run.py),
the nodes' data check, this app's hooks on any Flower strategy, building the strategy from the run
config, the privacy accountant, and stopping a run cleanly."""
