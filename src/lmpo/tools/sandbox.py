"""The ``python`` tool: model-written code in a sandboxed subprocess.

Each run gets a fresh temporary working directory (deleted afterwards) and these limits:

- **CPU time** (``RLIMIT_CPU``), **address space** (``RLIMIT_AS``: a 10 GB allocation fails with ``MemoryError``),
  **output** (``RLIMIT_FSIZE`` on the files that catch stdout/stderr; the model sees at most ``max_output_chars``),
  **open files** (``RLIMIT_NOFILE``), and **processes** (``RLIMIT_NPROC``); the child sets them on itself first thing;
- **wall clock**: the parent kills the whole process group after ``wall_seconds``;
- **no network, no stray processes, no writes elsewhere**: where ``unshare`` can create namespaces (as root, or
  unprivileged user namespaces), the child runs in a new network namespace (only a down loopback), PID namespace
  (everything in it dies with it) and mount namespace in which every mount but the working directory is read-only.
  Without ``unshare`` only the audit hook below does this (``sandbox_isolation()`` says which layers are active);
  run lmpo in a container for untrusted code at scale;
- **an audit hook** inside the child (``_sandbox_child.py``) refuses sockets, process creation (fork, exec,
  subprocess: this is what stops a fork bomb when running as root, where the kernel ignores ``RLIMIT_NPROC``),
  ctypes/cffi, and writes, deletes or renames outside the working directory.

The environment is minimal (no inherited variables; one BLAS/OpenMP thread). Reading files is not restricted.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_LIMITS_PRELUDE = """import resource as _r
for _k, _v in {limits!r}.items():
    _r.setrlimit(getattr(_r, _k), _v)
del _r, _k, _v
"""


# Run inside the new mount namespace: keep the working directory writable (its own bind mount), make every other
# mount read-only (per mount point; a private namespace, so nothing changes outside), then exec the command.
_READONLY = """mount --bind "$1" "$1" && cd "$1" || exit 97
while read -r _ m _; do
  [ "$m" = "$1" ] || mount -o remount,bind,ro "$m" 2>/dev/null || true
done < /proc/self/mounts
shift
exec "$@"
"""


def _probe(prefix: list[str], readonly: bool) -> bool:
    """Whether ``prefix`` runs here (and, with ``readonly``, leaves only the working directory writable)."""
    workdir = tempfile.mkdtemp(prefix="lmpo-sandbox-probe-")
    escape = workdir + ".escape"
    check = ["sh", "-c", f'touch "{workdir}/ok" && ! touch "{escape}" 2>/dev/null'] if readonly else ["true"]
    cmd = [*prefix, "sh", "-c", _READONLY, "sh", workdir, *check] if readonly else [*prefix, *check]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(escape):
            os.remove(escape)


@functools.lru_cache(maxsize=1)
def _isolation() -> tuple[tuple[str, ...], bool]:
    """The ``unshare`` prefix that works here and whether it includes the read-only mount namespace."""
    exe = shutil.which("unshare")
    if exe is None:
        return (), False
    base = ["--net", "--pid", "--fork", "--kill-child"]
    for user in ([], ["--user", "--map-root-user"]):
        for readonly in (True, False):
            prefix = [exe, *user, *(["--mount"] if readonly else []), *base]
            if _probe(prefix, readonly):
                return tuple(prefix), readonly
    return (), False


def _namespace_prefix(workdir: str | None = None) -> tuple[str, ...]:
    """The command prefix that puts a run in its namespaces (``()`` if none can be created here)."""
    prefix, readonly = _isolation()
    if readonly:
        return (*prefix, "sh", "-c", _READONLY, "sh", workdir or tempfile.gettempdir())
    return prefix


def sandbox_isolation() -> str:
    """What isolates runs here: ``"namespaces+readonly"`` (network, PID and a read-only mount namespace),
    ``"namespaces"`` (network and PID), or ``"audit-hook"`` (only the hook inside the child)."""
    prefix, readonly = _isolation()
    return ("namespaces+readonly" if readonly else "namespaces") if prefix else "audit-hook"


@functools.lru_cache(maxsize=1)
def _child_source() -> str:
    with open(CHILD, encoding="utf-8") as f:
        return f.read()


@dataclass
class SandboxResult:
    """What a sandboxed run did: its output (truncated), exit status, and the limit it hit, if any."""

    stdout: str
    stderr: str
    returncode: int | None
    error: str | None
    seconds: float

    def text(self) -> str:
        """The observation the model sees."""
        parts = [self.stdout.rstrip()] if self.stdout.strip() else []
        if self.stderr.strip():
            parts.append("stderr:\n" + self.stderr.rstrip())
        if self.error:
            parts.append(f"error: {self.error}")
        return "\n".join(parts) if parts else "(no output)"


def _read(path: str, limit: int, *, tail: bool = False) -> str:
    """The file's text cut to ``limit`` characters: its head, or its tail (for tracebacks)."""
    with open(path, "rb") as f:  # at most RLIMIT_FSIZE bytes
        text = f.read().decode("utf-8", errors="replace")
    if len(text) <= limit:
        return text
    if tail:
        return f"[... output truncated to the last {limit} characters]\n" + text[-limit:]
    return text[:limit] + f"\n[... output truncated at {limit} characters]"


@dataclass(frozen=True)
class Sandbox:
    """Limits of the ``python`` tool; :meth:`run` executes code, :meth:`as_tool` is the tool function."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 512
    max_output_chars: int = 2000
    max_output_bytes: int = 1_000_000
    max_processes: int = 16

    def _limits(self) -> dict:
        return {
            "RLIMIT_CPU": (self.cpu_seconds, self.cpu_seconds + 1),
            "RLIMIT_AS": (self.memory_mb << 20, self.memory_mb << 20),
            "RLIMIT_FSIZE": (self.max_output_bytes, self.max_output_bytes),
            "RLIMIT_NOFILE": (64, 64),
            "RLIMIT_NPROC": (self.max_processes, self.max_processes),
            "RLIMIT_CORE": (0, 0),
        }

    def run(self, code: str) -> SandboxResult:
        """Run ``code`` as a script in a fresh temporary directory under the limits; never raises for bad code."""
        workdir = tempfile.mkdtemp(prefix="lmpo-sandbox-")
        start = time.monotonic()
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
            prelude = _LIMITS_PRELUDE.format(limits=self._limits())
            cmd = [*_namespace_prefix(workdir), sys.executable, "-I", "-c", prelude + _child_source()]
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
                try:
                    proc.wait(timeout=self.wall_seconds)
                    error = None
                except subprocess.TimeoutExpired:
                    error = f"wall-clock limit of {self.wall_seconds:g} s exceeded; the process was killed"
                finally:
                    _kill_group(proc)
            stdout = _read(out_path, self.max_output_chars)
            stderr = "".join(line for line in _read(err_path, self.max_output_chars, tail=True).splitlines(True)
                             if not line.startswith("unshare: "))  # unshare's own notes on how the child died
            full = max(os.path.getsize(out_path), os.path.getsize(err_path)) >= self.max_output_bytes
            error = error or self._diagnose(proc.returncode, stderr, full)
            return SandboxResult(stdout, stderr, proc.returncode, error, time.monotonic() - start)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _diagnose(self, rc: int | None, stderr: str, output_full: bool) -> str | None:
        """The limit a finished run hit, from its exit status and output (the wall clock is known beforehand)."""
        cpu_rc = (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)
        if rc in cpu_rc or "sandbox: CPU-time limit exceeded" in stderr:
            return f"CPU-time limit of {self.cpu_seconds} s exceeded; the process was killed"
        if output_full:
            return f"output limit of {self.max_output_bytes} bytes exceeded"
        if "MemoryError" in stderr:
            return f"memory limit of {self.memory_mb} MB exceeded"
        if rc:
            return f"exit status {rc}"
        return None

    def as_tool(self) -> Callable[[str], str]:
        """The ``python`` tool function running code under these limits."""
        sandbox = self

        def python(code: str) -> str:
            """Run a Python program in a sandbox (no network, no subprocesses, a temporary directory, time and
            memory limits) and return what it prints.

            Args:
                code: The complete Python program; use print() to show results.
            """
            return sandbox.run(code).text()

        return python


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (it has its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


python = Sandbox().as_tool()
