"""Command-line runs of the tests, forked from a warm interpreter instead of started cold.

A test that runs ``python -m s3prl_laser.finetune ...`` as a user does pays for a fresh interpreter that
imports torch, torch._dynamo (torch's optimizers import it), torchaudio and s3prl: 4-6 s of CPU before the
command's own work, which is most of the test on these tiny models. ``run`` and ``Popen`` take the arguments
of their ``subprocess`` namesakes and start the command in a child forked from a server that has already
imported those libraries (the "warm interpreter", started on first use, one per environment). The child then
does what ``python ARGS`` does: ``sys.argv``, ``sys.path[0]``, the working folder, the environment and the
standard streams of the request, the module, script or ``-c`` code as ``__main__``, the same exit status and
traceback, atexit handlers at the end. What differs is only which modules are already in ``sys.modules``.

So tests of start-up itself (what ``--help`` imports, the .pth hook, registration on the first
``s3prl.hub`` import, a broken torchaudio, the quiet screen, which also covers import-time warnings) keep
using ``subprocess``. Commands that are not this interpreter's Python also go to ``subprocess``. A request
whose environment differs from every server's in a variable that a library reads when it is imported
(``OMP_NUM_THREADS``, ``TRITON_INTERPRET``, ``PYTHONPATH``, ...) gets its own server, started with that
environment; past ``MAX_SERVERS`` such environments it runs cold. Only the variables in ``READ_AT_RUN_TIME``
(and ``S3PRL_LASER_*``) may differ between a server and its requests; nothing that the server imports reads
them at import.

The server forks only from its single thread, before any parallel torch operation; numpy's OpenBLAS threads
are stopped and restarted around the fork by OpenBLAS itself (as for DataLoader workers).
"""

from __future__ import annotations

import contextlib
import json
import locale
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "torchaudio", "s3prl", "numpy", "yaml", "tqdm")

# Variables that may differ between a server and the requests it serves: read only while a command runs, by
# torch.distributed, by this project (S3PRL_LASER_*) or by the tests' fault-injection scripts.
READ_AT_RUN_TIME = frozenset(
    {"PYTEST_CURRENT_TEST", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
     "MASTER_PORT", "LINEAR_ADAMW", "SIGNAL_TWICE", "SIGNAL_AT", "SIGNAL_PART", "FAIL_SAVE", "OOM_RANKS",
     "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"}
)  # fmt: skip  (the SLURM ids: read when a run takes its lock; one server per job id would use them all up)
MAX_SERVERS = 3  # distinct environments; further ones run cold
_LENGTH = struct.Struct("!Q")


def _import_time_env(env: dict) -> tuple:
    """The part of ``env`` that a server must share with the request: all but ``READ_AT_RUN_TIME``."""
    shared = (k for k in env if k not in READ_AT_RUN_TIME and not k.startswith("S3PRL_LASER_"))
    return tuple(sorted((k, env[k]) for k in shared))


# ----------------------------------------------------------------------------------------- the server
def serve(path: str) -> None:
    """Import ``PRELOAD``, say "ready" on stdout, then fork a child per request on the socket ``path``."""
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(Exception):  # the command meets the same error again, as a cold start does
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    waiting: dict[int, socket.socket] = {}
    while os.getppid() == parent:  # the test session is gone: stop
        if select.select([listener], [], [], 0.02)[0]:
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in [conn, *waiting.values()]:
                    other.close()
                _run_as_main(request, fds)  # never returns
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        _reap(waiting)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, _LENGTH.size, 3)
    (size,) = _LENGTH.unpack(header)
    payload = bytearray()
    while len(payload) < size:
        payload += conn.recv(size - len(payload))
    return json.loads(payload), fds


def _reap(waiting: dict[int, socket.socket]) -> None:
    """Send the exit status (``subprocess``'s returncode) of each finished child to its requester."""
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid)
        with contextlib.suppress(OSError):  # the requester may be gone
            conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        conn.close()


def _run_as_main(request: dict, fds: list[int]) -> None:
    """In the forked child: become ``python *request["argv"]`` and exit as it would."""
    import atexit
    import runpy
    import traceback
    import types

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv, sys.path[0] = list(argv), str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt as interrupt:
        traceback.print_exception(interrupt.with_traceback(_without_own_frames(interrupt.__traceback__)))
        code = -signal.SIGINT
    except BaseException as error:
        error = error.with_traceback(_without_own_frames(error.__traceback__))
        sys.excepthook(type(error), error, error.__traceback__)
        code = 1
    threading._shutdown()  # as the interpreter does at exit: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt ends the interpreter by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _without_own_frames(tb):
    """``tb`` from the first frame that is not this module's: a traceback as ``python ARGS`` prints it."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


# ----------------------------------------------------------------------------------------- the client
class _Server:
    def __init__(self, env: dict):
        self.folder = tempfile.mkdtemp(prefix="warm-python-")
        self.path = os.path.join(self.folder, "socket")
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.path], env=env, cwd=self.folder, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the warm interpreter did not start (exit status {self.process.wait()})")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.unlink(self.path)
        os.rmdir(self.folder)


_servers: dict[tuple, _Server] = {}
_lock = threading.Lock()


def _server_for(env: dict) -> _Server | None:
    key = _import_time_env(env)
    with _lock:
        if key not in _servers:
            if len(_servers) >= MAX_SERVERS:
                return None
            _servers[key] = _Server(env)
        return _servers[key]


def close_servers() -> None:
    """Stop every warm interpreter (the end of the test session)."""
    with _lock:
        for server in _servers.values():
            server.close()
        _servers.clear()


def _can_start_warm(args: list, kwargs: dict) -> bool:
    """``python -m MODULE ...``, ``python -c CODE ...`` or ``python SCRIPT ...`` of this interpreter."""
    if set(kwargs) - {"stdout", "stderr", "text", "env", "cwd"} or len(args) < 2 or args[0] != sys.executable:
        return False
    return args[1] in ("-m", "-c") and len(args) > 2 or not str(args[1]).startswith("-")


class Popen:
    """``subprocess.Popen`` for ``[sys.executable, ...]`` started by a warm interpreter.

    Supports what the tests use: ``stdout``/``stderr`` as ``PIPE`` (or ``STDOUT`` for stderr) or left alone,
    ``text``, ``env``, ``cwd``; ``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``,
    ``returncode``. Output is collected in temporary files, so a child never blocks on a full pipe.
    """

    def __new__(cls, args, **kwargs):
        env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
        server = _server_for(env) if _can_start_warm(list(args), kwargs) else None
        if server is None:
            return subprocess.Popen(args, **kwargs)
        self = super().__new__(cls)
        self._start(server, list(args), env, kwargs)
        return self

    def _start(self, server: _Server, args: list, env: dict, kwargs: dict) -> None:
        self.args, self.returncode, self._text = args, None, bool(kwargs.get("text"))
        self._files = {}
        fds = [os.open(os.devnull, os.O_RDONLY)]
        for name, fd in (("stdout", 1), ("stderr", 2)):
            where = kwargs.get(name)
            if where == subprocess.PIPE:
                self._files[name] = tempfile.TemporaryFile()  # noqa: SIM115 - read and closed by communicate
                fds.append(self._files[name].fileno())
            elif name == "stderr" and where == subprocess.STDOUT:
                fds.append(fds[1])
            elif where is None:
                fds.append(fd)
            else:
                raise ValueError(f"warm_processes.Popen: {name}={where!r} is not supported")
        argv = [str(arg) for arg in args[1:]]
        request = json.dumps({"argv": argv, "env": env, "cwd": str(kwargs.get("cwd") or os.getcwd())})
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server.path)
        socket.send_fds(self._conn, [_LENGTH.pack(len(request.encode()))], fds)
        self._conn.sendall(request.encode())
        os.close(fds[0])
        self._reply = self._conn.makefile("r")
        self.pid = int(self._reply.readline())

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def _read_status(self) -> None:
        self.returncode = int(self._reply.readline())
        self._reply.close()
        self._conn.close()

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        self.wait(timeout)
        return self._output("stdout"), self._output("stderr")

    def _output(self, name: str):
        file = self._files.pop(name, None)
        if file is None:
            return None
        file.seek(0)
        data = file.read()
        file.close()
        if not self._text:
            return data
        text = data.decode(locale.getpreferredencoding(False))
        return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as subprocess's text mode


def run(args, *, capture_output: bool = False, timeout: float | None = None, check: bool = False, **kwargs):
    """``subprocess.run`` through ``Popen`` above: a warm start where it can be, a cold one otherwise."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    process = Popen(args, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    done = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


if __name__ == "__main__":
    serve(sys.argv[1])
