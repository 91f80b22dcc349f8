"""Runs inside the sandbox process: ``python -I -c <rlimit prelude + this file>``; stdlib only, nothing from lmpo.

It installs an audit hook (which Python code cannot remove) that refuses: creating sockets and name lookups (the
socket module itself may be imported), starting processes (fork, exec, spawn, system, subprocess), looking up or
calling C functions through ctypes (numpy may still import ctypes), cffi, and any write, rename, delete or permission
change outside the sandbox's working directory. Then it runs ``main.py`` from that directory as ``__main__`` and
prints a traceback of the user's code only. The rlimits are set by the prelude that :mod:`lmpo.tools.sandbox` puts
before this file; the namespaces by the parent's ``unshare``. The hook guards against accidents (a model's
``rm -rf`` or stray socket); it is not a boundary against code written to escape it: the kernel layers are.
"""

import os
import signal
import sys
import traceback
import types

FORBIDDEN = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.sendto", "socket.sendmsg", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
    "os.system", "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlsym", "ctypes.dlsym/handle",
    "ctypes.call_function", "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents",
})
FORBIDDEN_MODULES = frozenset({"_posixsubprocess", "cffi", "_cffi_backend"})
PATH_EVENTS = frozenset({"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                         "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"})


def make_hook(root, realpath=os.path.realpath, fsdecode=os.fsdecode, sep=os.sep, devnull=os.devnull,
              write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
              forbidden=FORBIDDEN, modules=FORBIDDEN_MODULES, path_events=PATH_EVENTS):
    """The audit hook; it uses only values bound here, so changing this script's globals does not weaken it."""

    def inside(path):
        if isinstance(path, int):  # a file descriptor: already open
            return True
        try:
            real = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + sep) or real == devnull

    def hook(event, args):
        if event in forbidden:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and args[0] is not None:
            path, mode, flags = args[0], args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or bool(flags & write_flags)
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {fsdecode(path)!r} is not allowed (only inside {root})")
        elif event in path_events:
            for p in args:
                if isinstance(p, (str, bytes)) and not inside(p):
                    raise PermissionError(f"sandbox: {event} on {fsdecode(p)!r} is not allowed (only inside {root})")

    return hook


class _NoSubprocess(types.ModuleType):
    """Stands in for ``_posixsubprocess`` (whose ``fork_exec`` raises no audit event): every function refuses."""

    def __getattr__(self, name):
        def refuse(*args, **kwargs):
            raise PermissionError("sandbox: starting processes is not allowed")

        return refuse


def _cpu_limit(signum, frame):
    os.write(2, b"\nsandbox: CPU-time limit exceeded\n")
    os._exit(128 + signum)


def main():
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "main.py", "exec")
    sys.argv = ["main.py"]
    root = os.path.realpath(os.getcwd())
    sys.path.insert(0, root)
    signal.signal(signal.SIGXCPU, _cpu_limit)
    sys.modules["_posixsubprocess"] = _NoSubprocess("_posixsubprocess")  # `import subprocess` works, Popen not
    user_main = types.ModuleType("__main__")  # the user's own __main__: this script's module stays out of reach
    user_main.__builtins__ = __builtins__
    sys.modules["__main__"] = user_main
    sys.addaudithook(make_hook(root))
    try:
        exec(code, user_main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # the traceback of the user's code only, without this script's frame
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)


if __name__ == "__main__":
    main()
