"""What runs on a node (a SuperNode, or a Ray actor in simulation): the ClientApp entry (app.py,
torch-free at import), what a node does with one message (node_job.py) and its torch threads."""
