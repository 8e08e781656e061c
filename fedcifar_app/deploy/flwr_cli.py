"""Talking to the SuperLink's Control API with the `flwr` CLI (registering SuperNode keys).

`flwr supernode register|list` take the SuperLink's address and CA from a
pyproject.toml federation; a small generated "control project" holds exactly
this deployment's address, so registration never depends on the app's own
pyproject.toml.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import DeployError
from .processes import ANSI_ESCAPE, flower_executable

CONTROL_FEDERATION = "deployment"


def write_control_project(project_dir: Path, control_address: str, ca_certificate: Path | None) -> Path:
    """A minimal Flower project whose one federation is exactly this SuperLink.

    `flwr supernode register` takes its address and CA from a pyproject.toml and
    has no `--federation-config`; this keeps registration independent of the
    ports and paths in the app's own pyproject.toml.
    """
    project_dir.mkdir(parents=True, exist_ok=True)
    if ca_certificate is None:
        security = "insecure = true"
    else:
        security = f"root-certificates = {json.dumps(str(ca_certificate.resolve()))}"
    (project_dir / "pyproject.toml").write_text(
        "# Written by fedcifar-deploy: lets `flwr supernode register|list` reach\n"
        "# the SuperLink of this deployment. Not an app; do not `flwr run` it.\n"
        "[project]\n"
        'name = "fedcifar-deploy-control"\n'
        'version = "1.0.0"\n'
        'description = "Control-API settings of a local deployment"\n'
        'license = "Apache-2.0"\n'
        'authors = [{ name = "fedcifar-deploy" }]\n\n'
        "[tool.flwr.app]\n"
        'publisher = "fedcifar"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "fedcifar_app.server.app:app"\n'
        'clientapp = "fedcifar_app.client.app:app"\n\n'
        "[tool.flwr.federations]\n"
        f'default = "{CONTROL_FEDERATION}"\n\n'
        f"[tool.flwr.federations.{CONTROL_FEDERATION}]\n"
        f'address = "{control_address}"\n'
        f"{security}\n",
        encoding="utf-8",
    )
    return project_dir


def _json_from_cli_output(text: str) -> dict | None:
    """The JSON object the `flwr` CLI printed with --format json, if any."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def register_node_keys(
    public_keys: Sequence[Path], control_project: Path, env: Mapping[str, str], timeout_s: float
) -> list[str]:
    """Register SuperNode public keys with the SuperLink (in parallel); their node ids.

    `flwr supernode register` exits 0 even when it fails (1.25 prints the error
    and returns), so success is read from its JSON answer.
    """
    registrations = []
    for public_key in public_keys:
        command = [
            flower_executable("flwr"),
            "supernode",
            "register",
            str(public_key),
            str(control_project),
            CONTROL_FEDERATION,
            "--format",
            "json",
        ]
        registrations.append(
            (
                public_key,
                subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=dict(env),
                ),
            )
        )
    deadline = time.monotonic() + timeout_s
    node_ids, failure = [], None
    for public_key, process in registrations:
        try:
            stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failure = failure or f"`flwr supernode register {public_key}` did not answer in {timeout_s:g} s"
            continue
        answer = _json_from_cli_output(stdout)
        if answer and answer.get("success"):
            node_ids.append(str(answer.get("node-id", "")))
            continue
        detail = (answer or {}).get("error-message") or (stdout + stderr)
        detail = " ".join(ANSI_ESCAPE.sub("", str(detail)).split())[:300]
        failure = failure or f"registering {public_key} with the SuperLink failed: {detail}"
    if failure:
        raise DeployError(failure)
    return node_ids
