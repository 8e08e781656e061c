"""How many torch threads a ClientApp takes: its share of the machine's cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcifar_app.client.threads import choose_torch_threads, count_supernodes, threads_per_process
from fedcifar_app.errors import ConfigError


def test_threads_per_process_is_a_share_of_at_least_one() -> None:
    assert threads_per_process(2, 10) == 1
    assert threads_per_process(8, 3) == 2
    assert threads_per_process(4, 0) == 4


def test_node_config_then_environment_then_share() -> None:
    assert choose_torch_threads({"torch-threads": 3}, {"OMP_NUM_THREADS": "1"}, cores=2, supernodes=10) == 3
    assert choose_torch_threads({"partition-id": 0}, {"OMP_NUM_THREADS": "2"}, cores=2, supernodes=10) is None
    assert choose_torch_threads({}, {"OMP_NUM_THREADS": " "}, cores=8, supernodes=3) == 2
    assert choose_torch_threads({}, {}, cores=2, supernodes=0) == 2  # no SuperNode here: simulation or a script


@pytest.mark.parametrize("bad", [0, -1, "2", 1.5, True])
def test_a_bad_torch_threads_value_is_one_line(bad: object) -> None:
    with pytest.raises(
        ConfigError, match=r"node config torch-threads=.* must be an integer >= 1 \(e\.g\. --node-config"
    ):
        choose_torch_threads({"torch-threads": bad}, {}, cores=2, supernodes=1)


def test_count_supernodes_reads_command_lines(tmp_path: Path) -> None:
    """Console scripts run as `python .../flower-supernode`; a bare executable counts too."""
    command_lines = {
        "101": b"/venv/bin/python3\0/venv/bin/flower-supernode\0--superlink\0h:9092\0",
        "102": b"flower-supernode\0--insecure\0",
        "103": b"/venv/bin/python3\0/venv/bin/flower-superlink\0",
        "104": b"/venv/bin/python3\0-c\0flower-supernode\0",  # the name as a later argument: not a SuperNode
        "self": b"flower-supernode\0",  # not a pid folder
    }
    for name, command_line in command_lines.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cmdline").write_bytes(command_line)
    (tmp_path / "105").mkdir()  # a process that ended while we looked: no cmdline
    assert count_supernodes(tmp_path) == 2
    assert count_supernodes(tmp_path / "missing") == 0


def test_size_torch_threads_sets_torch(tmp_path: Path) -> None:
    """In a fresh process (torch's thread count is process-wide): node config wins over the default."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = (
        "import json, torch\n"
        "from fedcifar_app.client.threads import size_torch_threads\n"
        "before = torch.get_num_threads()\n"
        "print(json.dumps([before, size_torch_threads({'torch-threads': 1}), size_torch_threads({'torch-threads': 2})]))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])[1:] == [1, 2]
