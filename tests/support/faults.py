"""Write faults for tests: the app's atomic writes (``fedcifar_app.files``) fail as the kernel fails them.

``FaultyDisk.fail(name, code, after=0, full=False)`` makes writes of the file called ``name`` fail with
``OSError(code)`` once ``after`` of them went through: EROFS/EACCES/EMFILE when the temporary file is created
(the kernel refuses it), any other code (ENOSPC, EDQUOT) after half the bytes landed in it, so the
temporary file is really there, half written, when the writer must clean it up. ``full=True`` makes
every later write of any file fail too: a disk that filled up. Tests make one from ``monkeypatch``.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedcifar_app import files

CREATE_ERRORS = (errno.EROFS, errno.EACCES, errno.EMFILE)  # the kernel refuses the new file


class HalfWrite:
    """A stream that lands half of what it is given, then fails: a disk that fills up mid-file."""

    def __init__(self, stream: io.BufferedWriter, code: int) -> None:
        self.stream, self.code = stream, code

    def write(self, data: bytes) -> int:
        self.stream.write(data[: len(data) // 2])
        self.stream.flush()
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def __enter__(self) -> HalfWrite:
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


@dataclass
class Fault:
    code: int
    after: int  # writes of the file that still go through
    full: bool  # from the first failure on, every write fails (a disk that filled up)
    seen: int = 0


class FaultyDisk:
    """Makes the app's atomic writes fail as the kernel would; ``fail(name, code, after, full)``."""

    def __init__(self, monkeypatch) -> None:
        self.faults: dict[str, Fault] = {}
        self.full_code: int | None = None
        self.temporaries: list[Path] = []  # every temporary file a failing write created
        self._doomed: dict[int, int] = {}
        real_new_file, real_fdopen = files._new_file, os.fdopen

        def new_file(folder: Path, prefix: str):
            code = self._code_for(prefix.strip("."))
            if code in CREATE_ERRORS:
                raise OSError(code, os.strerror(code), str(folder / prefix))
            handle, path = real_new_file(folder, prefix)
            if code is not None:
                self._doomed[handle] = code
                self.temporaries.append(path)
            return handle, path

        def fdopen(fd, *args, **kwargs):
            stream = real_fdopen(fd, *args, **kwargs)
            code = self._doomed.pop(fd, None)
            return stream if code is None else HalfWrite(stream, code)

        monkeypatch.setattr(files, "_new_file", new_file)
        monkeypatch.setattr(os, "fdopen", fdopen)

    def fail(self, name: str, code: int, *, after: int = 0, full: bool = False) -> None:
        self.faults[name] = Fault(code, after, full)

    def _code_for(self, name: str) -> int | None:
        if self.full_code is not None:
            return self.full_code
        fault = self.faults.get(name)
        if fault is None:
            return None
        fault.seen += 1
        if fault.seen <= fault.after:
            return None
        if fault.full:
            self.full_code = fault.code
        return fault.code


def fail_path_call(monkeypatch: pytest.MonkeyPatch, method: str, applies: Callable[[Path], bool], code: int) -> None:
    """``Path.<method>`` raises ``OSError(code)`` for the paths ``applies`` picks, as the kernel would:
    root reads and creates where a user could not, so a test raises the kernel's error itself."""
    real = getattr(Path, method)

    def call(self: Path, *args, **kwargs):
        if applies(self):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, call)


def private_tmpfs_problem() -> str:
    """Why a tmpfs cannot be mounted in a private mount namespace here ('' when it can): the real full-disk tests."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return "" if probe.returncode == 0 else f"unshare -m fails here: {probe.stderr.decode().strip()}"
