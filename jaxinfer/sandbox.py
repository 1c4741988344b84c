"""Running untrusted code (a model's completion of a coding problem) where it can do no harm.

`run_sandboxed(program)`: a fresh isolated interpreter (Python's -I flag) in a temporary
directory, inside `unshare -rn` (a new user and network namespace: no interface) where the kernel
allows it, with sockets, subprocesses and file removal refused inside the interpreter either way,
RLIMIT_AS on its memory and RLIMIT_FSIZE on every file it writes (its stdout and stderr go to a
file, so a program that prints megabytes is stopped by the kernel), killed after a timeout. It
passes iff it exits with status 0. `jaxinfer eval`'s humaneval tasks score completions with it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

_GUARD = """\
import builtins, os, resource, shutil, socket, subprocess, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({out}, {out}))
def _refused(*a, **k):
    raise PermissionError("the sandbox has no network, no processes and no file removal")
socket.socket = socket.create_connection = socket.getaddrinfo = _refused
subprocess.Popen = os.system = os.fork = os.kill = os.remove = os.unlink = os.rmdir = shutil.rmtree = _refused
sys.modules["_socket"] = None
del builtins, os, resource, shutil, socket, subprocess, sys
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    reason: str  # "passed", "failed", "timed out"


_UNSHARE: bool | None = None


def _network_namespace() -> list[str]:
    """`unshare -rn` (a new user and network namespace: no interface but loopback) where the kernel
    allows it; else nothing (the Python-level guard still refuses sockets)."""
    global _UNSHARE
    if _UNSHARE is None:
        exe = shutil.which("unshare")
        _UNSHARE = bool(exe) and subprocess.run([exe, "-rn", "true"], capture_output=True).returncode == 0
    return ["unshare", "-rn"] if _UNSHARE else []


def run_sandboxed(program: str, timeout: float = 10.0, memory_bytes: int = 1 << 30,
                  output_bytes: int = 1 << 20) -> SandboxResult:
    """Runs untrusted `program` in a fresh isolated interpreter (`python -I`) in a temporary
    directory: no network (a network namespace where possible, sockets refused in any case), no
    subprocesses or file removal, `memory_bytes` of address space, every file it writes (its
    stdout and stderr included: they go to a file) at most `output_bytes` (past that the kernel
    stops it: a program that prints megabytes fails), killed after `timeout` seconds. Passes iff
    it exits with status 0."""
    with tempfile.TemporaryDirectory(prefix="jaxinfer-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD.format(mem=memory_bytes, out=output_bytes) + program)
        cmd = _network_namespace() + [sys.executable, "-I", path]
        with open(os.path.join(tmp, "output"), "wb") as out:
            try:
                proc = subprocess.run(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                      timeout=timeout, env={"PATH": os.environ.get("PATH", "")})
            except subprocess.TimeoutExpired:
                return SandboxResult(False, "timed out")
    return SandboxResult(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed")
