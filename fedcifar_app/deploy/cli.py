"""The `fedcifar-deploy` command line: flags in, `UpOptions` out, one line on failure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import DeployError
from ..files import write_problem
from .commands import (
    DEFAULT_CLIENTAPPIO_BASE_PORT,
    DEFAULT_SUPERLINK_PORTS,
    DEFAULT_SUPERNODE_MAX_RETRIES,
    DEFAULT_SUPERNODE_MAX_WAIT_S,
    SuperLinkPorts,
)
from .orchestration import (
    DEFAULT_DEPLOY_DIR,
    DEFAULT_READY_TIMEOUT_S,
    DEFAULT_STOP_GRACE_S,
    UpOptions,
    bring_down,
    bring_up,
    deployment_status,
    describe,
    suggested_run_command,
)
from .preflight import check_superlink
from .roles import SuperNodeOptions, make_node_key, register_key, start_supernode


def _superlink_ports(text: str) -> SuperLinkPorts:
    try:
        return SuperLinkPorts.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def up_options(args: argparse.Namespace) -> UpOptions:
    """The parsed `up` flags as validated options (DeployError on a bad combination)."""
    return UpOptions(
        directory=Path(args.dir),
        nodes=args.nodes,
        tls=args.tls,
        auth=args.auth,
        superlink_ports=args.superlink_ports,
        clientappio_base_port=args.clientappio_base_port,
        node_configs=tuple(args.node_config or ()),
        data_paths=tuple(args.data_path or ()),
        host=args.host,
        tls_sans=tuple(args.tls_san),
        ready_timeout_s=args.ready_timeout,
        stop_grace_s=args.stop_grace,
        supernode_max_retries=args.supernode_max_retries,
        supernode_max_wait_s=args.supernode_max_wait_time,
        clientapp_threads=args.clientapp_threads,
        warm=not args.cold,
    )


def command_up(args: argparse.Namespace) -> int:
    """`up`: start everything, print where it is and how to use it."""
    state = bring_up(up_options(args))
    print(describe(state))
    print(f"run (in the app folder, on this machine): {suggested_run_command(state, Path.cwd())}")
    print(f"stop: fedcifar-deploy down --dir {args.dir}")
    return 0


def command_down(args: argparse.Namespace) -> int:
    """`down`: end the recorded processes, drop the state, keep the logs."""
    print(bring_down(Path(args.dir), args.stop_grace))
    return 0


def command_status(args: argparse.Namespace) -> int:
    """`status`: what is recorded and whether it still runs; exit 1 if anything died."""
    text, all_running = deployment_status(Path(args.dir))
    print(text)
    return 0 if all_running else 1


def command_superlink(args: argparse.Namespace) -> int:
    """`superlink`: this machine's SuperLink for SuperNodes on other machines (TLS, auth, public names)."""
    options = UpOptions(
        directory=Path(args.dir),
        nodes=0,
        tls=True,
        auth=not args.no_auth,
        superlink_ports=args.superlink_ports,
        host="0.0.0.0",
        tls_sans=tuple(args.public_name),
        ready_timeout_s=args.ready_timeout,
        stop_grace_s=args.stop_grace,
    )
    state = bring_up(options)
    print(describe(state))
    print(f"copy {state.ca_certificate} (not the keys) to every SuperNode machine and to the machine running `flwr`")
    if options.auth:
        print(f"register each SuperNode's public key first: fedcifar-deploy register KEY.pub --dir {args.dir}")
    print(f"stop: fedcifar-deploy down --dir {args.dir}")
    return 0


def command_key(args: argparse.Namespace) -> int:
    """`key`: a SuperNode's key pair; only the .pub leaves this machine."""
    private, public = make_node_key(Path(args.path))
    print(f"private key {private} (stays on this machine), public key {public} (register it with the SuperLink)")
    return 0


def command_register(args: argparse.Namespace) -> int:
    """`register`: tell the SuperLink to accept a SuperNode's public key."""
    project = None if args.control else Path(args.dir).expanduser().resolve() / "control"
    node_id = register_key(Path(args.public_key), project, args.control or "", Path(args.ca) if args.ca else None)
    print(f"registered {args.public_key}: node id {node_id}")
    return 0


def command_supernode(args: argparse.Namespace) -> int:
    """`supernode`: one SuperNode on this machine for a SuperLink elsewhere."""
    options = SuperNodeOptions(
        directory=Path(args.dir),
        superlink=args.superlink,
        node_config=args.node_config,
        ca_certificate=Path(args.ca) if args.ca else None,
        private_key=Path(args.key) if args.key else None,
        clientappio_port=args.clientappio_port,
        ready_timeout_s=args.ready_timeout,
        stop_grace_s=args.stop_grace,
        warm=not args.cold,
    )
    state = start_supernode(options)
    print(describe(state))
    print(f"stop: fedcifar-deploy down --dir {args.dir}")
    return 0


def command_check(args: argparse.Namespace) -> int:
    """`check`: can this machine reach the SuperLink at HOST:PORT (and trust its certificate)?"""
    check_superlink(args.superlink, Path(args.ca) if args.ca else None)
    print(
        f"{args.superlink} accepts connections"
        + (f"; its certificate is valid for it under {args.ca}" if args.ca else "")
    )
    return 0


def _add_cold(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--cold",
        action="store_true",
        help="start every ClientApp process from scratch (Flower's own way) instead of forking it from a "
        "warm parent that has torch imported (docs/deployment.md: Warm ClientApp start)",
    )


def _add_common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--dir",
        default=DEFAULT_DEPLOY_DIR,
        help=f"folder for logs, certificates, keys and the pid file (default: {DEFAULT_DEPLOY_DIR})",
    )
    sub.add_argument(
        "--stop-grace",
        type=float,
        default=DEFAULT_STOP_GRACE_S,
        help="seconds between SIGTERM and SIGKILL when stopping (default: %(default)s)",
    )


def _add_superlink_ports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--superlink-ports",
        type=_superlink_ports,
        default=SuperLinkPorts(*DEFAULT_SUPERLINK_PORTS),
        metavar="SERVERAPPIO,FLEET,CONTROL",
        help=f"SuperLink ports (default: {','.join(map(str, DEFAULT_SUPERLINK_PORTS))})",
    )


def _add_up(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="start a SuperLink and N SuperNodes")
    _add_common(up)
    up.add_argument("--nodes", type=int, default=UpOptions.nodes, help="number of SuperNodes (default: %(default)s)")
    up.add_argument("--tls", action="store_true", help="TLS with a generated CA (DIR/certs)")
    up.add_argument(
        "--auth", action="store_true", help="SuperNode authentication: a registered P-384 key per node (needs --tls)"
    )
    _add_superlink_ports(up)
    up.add_argument(
        "--clientappio-base-port",
        type=int,
        default=DEFAULT_CLIENTAPPIO_BASE_PORT,
        help="ClientAppIo port of the first SuperNode; the next ones count up (default: %(default)s)",
    )
    up.add_argument(
        "--node-config",
        action="append",
        metavar='"k=v ..."',
        help="node config of one SuperNode; give once per node (default: partition-id=i num-partitions=N)",
    )
    up.add_argument(
        "--data-path",
        action="append",
        metavar="FOLDER",
        help="a SuperNode's own data folder, node config data-path=FOLDER; once per node",
    )
    up.add_argument(
        "--host",
        default=UpOptions.host,
        help="address the Fleet and Control APIs listen on; 0.0.0.0 to accept other machines (default: %(default)s)",
    )
    up.add_argument(
        "--tls-san",
        action="append",
        default=[],
        metavar="NAME",
        help="host name or IP other machines use for this SuperLink: named in its certificate (repeatable)",
    )
    up.add_argument(
        "--clientapp-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per ClientApp (OMP_NUM_THREADS of the SuperNodes; default: cores / --nodes)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help="seconds the SuperLink, then all SuperNodes together, may take to come up (default: %(default)s)",
    )
    up.add_argument(
        "--supernode-max-retries",
        type=int,
        default=DEFAULT_SUPERNODE_MAX_RETRIES,
        help="reconnection attempts before a SuperNode gives up (default: %(default)s)",
    )
    up.add_argument(
        "--supernode-max-wait-time",
        type=float,
        default=DEFAULT_SUPERNODE_MAX_WAIT_S,
        help="seconds a SuperNode keeps reconnecting before it gives up (default: %(default)s)",
    )
    _add_cold(up)
    up.set_defaults(handler=command_up)


def _add_roles(commands: argparse._SubParsersAction) -> None:
    """The per-machine commands of a deployment across hosts."""
    superlink = commands.add_parser("superlink", help="this machine's SuperLink, for SuperNodes on other machines")
    _add_common(superlink)
    superlink.add_argument(
        "--public-name",
        action="append",
        required=True,
        metavar="NAME",
        help="host name or IP other machines use for this one: named in the certificate (repeatable)",
    )
    superlink.add_argument("--no-auth", action="store_true", help="accept SuperNodes without registered keys")
    _add_superlink_ports(superlink)
    superlink.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, help="seconds to come up")
    superlink.set_defaults(handler=command_superlink)

    key = commands.add_parser("key", help="make a SuperNode key pair (PATH and PATH.pub)")
    key.add_argument("path", metavar="PATH", help="the private key file to write, e.g. supernode.key")
    key.set_defaults(handler=command_key)

    register = commands.add_parser("register", help="register a SuperNode's public key with the SuperLink")
    _add_common(register)
    register.add_argument("public_key", metavar="KEY.pub")
    register.add_argument("--control", metavar="HOST:PORT", help="the SuperLink's Control API, from another machine")
    register.add_argument("--ca", metavar="ca.crt", help="the SuperLink's CA certificate, with --control")
    register.set_defaults(handler=command_register)

    supernode = commands.add_parser("supernode", help="one SuperNode on this machine for a SuperLink elsewhere")
    _add_common(supernode)
    supernode.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API")
    supernode.add_argument("--node-config", required=True, metavar='"k=v ..."', help="e.g. \"data-path='/data/a'\"")
    supernode.add_argument("--ca", metavar="ca.crt", help="the SuperLink's CA certificate (without it: --insecure)")
    supernode.add_argument("--key", metavar="KEY", help="this SuperNode's private key (SuperNode authentication)")
    supernode.add_argument("--clientappio-port", type=int, default=DEFAULT_CLIENTAPPIO_BASE_PORT)
    supernode.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, help="seconds to connect")
    _add_cold(supernode)
    supernode.set_defaults(handler=command_supernode)

    check = commands.add_parser("check", help="can this machine reach a SuperLink API and trust its certificate?")
    check.add_argument("--superlink", required=True, metavar="HOST:PORT")
    check.add_argument("--ca", metavar="ca.crt")
    check.set_defaults(handler=command_check)


def build_parser() -> argparse.ArgumentParser:
    """The `fedcifar-deploy` command line."""
    parser = argparse.ArgumentParser(
        prog="fedcifar-deploy",
        description="Start and stop a local Flower deployment (SuperLink + SuperNodes).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_up(commands)
    _add_roles(commands)
    down = commands.add_parser("down", help="stop the processes that `up` started")
    _add_common(down)
    down.set_defaults(handler=command_down)
    status = commands.add_parser("status", help="show the recorded processes")
    _add_common(status)
    status.set_defaults(handler=command_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fedcifar-deploy` and `python -m fedcifar_app.deploy`."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DeployError as err:
        print(f"fedcifar-deploy: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # its folder (state, logs, certificates, keys) on a full or read-only disk
        what, fix = write_problem(err)
        print(f"fedcifar-deploy: {err.filename or 'a file'}: {what}; {fix}, or use another folder", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedcifar-deploy: interrupted; stopped what was started", file=sys.stderr)
        return 130
