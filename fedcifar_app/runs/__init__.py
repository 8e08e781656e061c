"""The run folder: its files (folder.py), checkpoint, round-by-round recorder, status.json, run.log,
metrics rows, plots, TensorBoard scalars, and comparing run folders (fedcifar-compare)."""
