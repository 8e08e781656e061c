"""The warm ClientApp start: Flower's one-process-per-message model, without `import torch` per message.

A SuperNode's SuperExec starts the executable ``flwr-clientapp`` by name for every message (Flower
1.25 and 1.42 alike). Our SuperNodes get a PATH whose first ``flwr-clientapp`` is the shim
(shim.py): it hands its argv, environment, working directory, stdio and process settings to a warm
parent (parent.py) over a Unix socket; the parent, which has imported torch, numpy and Flower's
ClientApp runtime and nothing else, forks; the child takes on the shim's process state (child.py)
and runs Flower's own ``flwr-clientapp`` entry point, which loads the app from the FAB Flower
installed for the run. The shim forwards signals and exits with the child's exit code. Whenever
the warm path cannot be used, the shim prints one WARNING line and execs Flower's real
``flwr-clientapp``: the message runs cold, never fails because of the warm start.

- protocol.py  the messages over the socket (stdlib only: the shim imports it per message)
- shim.py      the ``flwr-clientapp`` stand-in (``fedcifar-warm-shim``; stdlib only)
- parent.py    the warm parent: its serve loop (requests, forks, children's exit codes, signals)
- fork_safety.py what the parent preloads; whether its state and a request allow an exact fork
- child.py     what a forked child does before Flower runs: the shim's process state, threads
- folder.py    the socket folder and the shim's PATH entry, for fedcifar-deploy and the CLI
- cli.py       ``fedcifar-warm``: a warm parent for ``fedcifar-deploy``, or around a plain ``flower-supernode``
"""
