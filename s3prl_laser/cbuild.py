"""Our C kernels: compiled on first use with the system C compiler, loaded with ctypes, run on threads.

Used by the soft-DTW CPU kernel (``softdtw/sdtw_cpu.c``) and the probe head's CPU kernels
(``probe/head_cpu.c``). :func:`build` compiles a source once per (source, compiler, flags, CPU) into
``$S3PRL_LASER_HOME`` (default ``~/.cache/s3prl_laser``), first with ``-march=native`` and, if that fails,
without it; the file is written atomically, so concurrent first uses (every rank of a job) are safe.
Without a compiler, or when it fails, :class:`KernelBuildError` says so in one line and names the
fallback. :func:`run_parallel` runs calls into a library on a process-wide thread pool: ctypes releases
the GIL while C code runs, so they run in parallel.

Torch-free (layer 0).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FLAGS = ["-O3", "-ffast-math", "-fPIC", "-shared", "-fno-strict-aliasing"]
NATIVE_FLAGS = ["-march=native", "-mprefer-vector-width=512"]

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


class KernelBuildError(RuntimeError):
    """A C kernel could not be compiled or loaded (no C compiler, or the compiler failed)."""


def cache_dir() -> Path:
    """Where compiled kernels live: ``$S3PRL_LASER_HOME`` or ``~/.cache/s3prl_laser``."""
    root = os.environ.get("S3PRL_LASER_HOME")
    return Path(root) if root else Path.home() / ".cache" / "s3prl_laser"


def compiler(what: str, fallback: str) -> str:
    """The C compiler to use (``$CC``, else ``cc``, else ``gcc``); ``what``/``fallback`` word the error."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelBuildError(f"no C compiler found (set $CC or install gcc) for {what}; {fallback}")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _compile(
    cc: str, source: Path, variants: Sequence[Sequence[str]], target: Path, flags: list[str]
) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = []
        for k, defines in enumerate(variants):
            obj = Path(tmp) / f"{source.stem}_{k}.o"
            subprocess.run(
                [cc, *flags, *defines, "-c", str(source), "-o", str(obj)],
                check=True,
                capture_output=True,
                text=True,
            )
            objects.append(str(obj))
        partial = Path(tmp) / target.name
        subprocess.run(
            [cc, *flags, *objects, "-o", str(partial), "-lm"], check=True, capture_output=True, text=True
        )
        os.replace(partial, target)  # atomic: a concurrent loader sees the old file or the whole new one


def _build_facts(source: Path, cc: str, variants: Sequence[Sequence[str]]) -> bytes:
    """What every build of ``source`` depends on besides its flags: the source, compiler, variants and CPU."""
    parts = [source.read_bytes(), cc.encode(), repr([list(v) for v in variants]).encode(),
             platform.machine().encode(), _cpu_id().encode()]  # fmt: skip
    return b"\0".join(parts)


def build(source: Path, variants: Sequence[Sequence[str]], what: str, fallback: str) -> Path:
    """Compile ``source`` once per variant (each a list of ``-D`` defines) into one shared library in
    :func:`cache_dir`, or return the one already there; raises :class:`KernelBuildError`."""
    if not source.is_file():
        raise KernelBuildError(
            f"{source} is missing from this installation (package data "
            f"{source.parent.name}/*.c): reinstall; {fallback}"
        )
    cc = compiler(what, fallback)
    directory = cache_dir()
    facts = _build_facts(source, cc, variants)
    targets = []
    for flags in (FLAGS + NATIVE_FLAGS, FLAGS):
        key = hashlib.sha256(facts + b"\0" + " ".join(flags).encode()).hexdigest()[:16]
        targets.append((flags, directory / f"{source.stem}-{key}.so"))
    for _, target in targets:
        if target.exists():  # built before, here or by a shared installation (the folder may be read-only)
            return target
    errors = []
    for flags, target in targets:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _compile(cc, source, variants, target, flags)
            return target
        except subprocess.CalledProcessError as err:
            errors.append(err.stderr.strip())
        except OSError as err:
            raise KernelBuildError(
                f"cannot write compiled kernels into {directory} ({err.strerror or err}): "
                f"set $S3PRL_LASER_HOME to a writable folder; {fallback}"
            ) from err
    raise KernelBuildError(f"compiling {source.name} with {cc} failed: {errors[-1][-2000:]}")


def load(path: Path, void_functions: Sequence[str]) -> ctypes.CDLL:
    """Load a built library; the named functions return nothing (``restype = None``)."""
    try:
        library = ctypes.CDLL(str(path))
    except OSError as err:
        raise KernelBuildError(f"loading {path} failed: {err}") from err
    for name in void_functions:
        getattr(library, name).restype = None
    return library


def address(tensor, offset: int = 0) -> ctypes.c_void_p:
    """A C pointer to element ``offset`` of a contiguous tensor (anything with ``data_ptr`` and
    ``element_size``), for a ctypes call."""
    return ctypes.c_void_p(tensor.data_ptr() + offset * tensor.element_size())


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool with at least ``workers`` threads, created on first use."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="s3prl-laser-c"), workers
        return _pool


def run_parallel(calls: Sequence[tuple[Callable, ...]]) -> None:
    """Run every ``(fn, *args)``: the first on this thread, the others on the pool, and wait for all."""
    if not calls:
        return
    futures = [_executor(len(calls) - 1).submit(*call) for call in calls[1:]]
    calls[0][0](*calls[0][1:])
    for future in futures:
        future.result()
