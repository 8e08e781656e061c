"""A copy of the app whose ClientApp reports on itself and can crash on purpose (the warm-start tests).

Flower runs the app from the FAB that `flwr run` builds of the app folder, installed under the
SuperNode's FLWR_HOME. These tests run a COPY of the app with two additions that the installed
package lacks, so what a ClientApp process did shows which code it ran:

- fedcifar_app/client/app.py, when imported: one JSON line appended to $FEDCIFAR_TEST_RECORD (the
  module's file, the process and its parent, torch's and OpenBLAS's thread counts);
- NodeJob.train: the process SIGKILLs itself when the node labelled $FEDCIFAR_TEST_CRASH_NODE trains
  round $FEDCIFAR_TEST_CRASH_ROUND (a crash, not an exception: nothing replies for it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from support.flwr_run import PROJECT

RECORD_ENV = "FEDCIFAR_TEST_RECORD"
CRASH_NODE_ENV = "FEDCIFAR_TEST_CRASH_NODE"
CRASH_ROUND_ENV = "FEDCIFAR_TEST_CRASH_ROUND"

RECORDER = f'''

def _record_this_process() -> None:
    """Test instrumentation (tests/support/instrumented_app.py): which code and threads this process has."""
    import ctypes as _ctypes
    import json as _json
    import os as _os

    import torch as _torch

    path = _os.environ.get("{RECORD_ENV}")
    if not path:
        return
    blas = None
    with open("/proc/self/maps", encoding="utf-8") as maps:
        libraries = sorted({{line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}})
    for library in libraries:
        getter = getattr(_ctypes.CDLL(library, mode=_os.RTLD_NOLOAD), "scipy_openblas_get_num_threads64_", None)
        if getter is not None:
            blas = getter()
    record = {{
        "file": __file__,
        "pid": _os.getpid(),
        "ppid": _os.getppid(),
        "torch_threads": _torch.get_num_threads(),
        "openblas_threads": blas,
    }}
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(_json.dumps(record) + "\\n")


_record_this_process()
'''

CRASH = f"""        import os as _os
        import signal as _signal

        if (
            _os.environ.get("{CRASH_NODE_ENV}") == self.node.label
            and _os.environ.get("{CRASH_ROUND_ENV}") == str(server_round)
        ):
            _os.kill(_os.getpid(), _signal.SIGKILL)  # test instrumentation: a crash mid-training
"""
TRAIN_SIGNATURE = "    def train(\n"


def instrumented_app(folder: Path) -> Path:
    """Copy the app into `folder` with the recorder and the crash switch; the copy's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PROJECT / "fedcifar_app", folder / "fedcifar_app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, folder / name)
    app = folder / "fedcifar_app" / "client" / "app.py"
    app.write_text(app.read_text(encoding="utf-8") + RECORDER, encoding="utf-8")
    node_job = folder / "fedcifar_app" / "client" / "node_job.py"
    text = node_job.read_text(encoding="utf-8")
    start = text.index(TRAIN_SIGNATURE)
    body = text.index('"""', text.index('"""', start) + 3) + 4  # after the method's docstring line
    node_job.write_text(text[:body] + CRASH + text[body:], encoding="utf-8")
    return folder


def records(path: Path) -> list[dict]:
    """The JSON lines the instrumented ClientApps wrote."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
