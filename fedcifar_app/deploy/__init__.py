"""Start, inspect and stop a Flower deployment: one SuperLink, N SuperNodes.

`fedcifar-deploy up` replaces a page of hand-typed `flower-superlink` /
`flower-supernode` commands (ports, certificates, node keys, node configs) with
one command that waits until every process is really connected and, when one
is not, stops what it started and names the log to read. `fedcifar-deploy down`
ends exactly those processes again, by the pids recorded in the state file.

The package never imports Flower: it runs Flower's own command line tools, so
what it does can be repeated by hand. One concern per module:

- errors.py        DeployError, the one-line failure every module raises
- state.py         DIR/state.json: the pids and addresses `up` recorded
- processes.py     start, watch (/proc) and stop process sessions; readiness and ports
- certificates.py  the TLS CA and SuperLink certificate, SuperNode key pairs
- flwr_cli.py      `flwr supernode register` through a small control project
- commands.py      SuperLink/SuperNode command lines, node configs, thread shares
- orchestration.py up / down / status on top of the pieces above (UpOptions in)
- cli.py           argparse: the `fedcifar-deploy` command line builds UpOptions
"""
