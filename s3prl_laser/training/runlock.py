"""One writer per run folder: rank 0 of a run holds an OS lock on ``OUT/run.lock`` from before it writes
anything in ``--out`` until the process ends.

A second run or ``--resume`` into the same ``--out`` while the lock is held (an ``sbatch`` typed twice, a
requeued job beside the live one, on this machine or another node) is refused on every one of its ranks
with one line naming the holder, which the holder wrote into the lock file: host, pid, SLURM job id (when
there is one) and since when. The lock is a POSIX record lock (``fcntl.lockf``): the operating system
releases it when the holding process ends in any way (``kill -9`` included), so a lock left by a dead
process never blocks; the next run takes it over and writes its own holder line. On network file systems
the lock is only as good as the file system's locking: NFS (v3 with ``lockd``, v4 natively) and Lustre
mounted with ``-o flock`` share POSIX locks between nodes; an NFS mount with ``nolock`` or Lustre with
``-o localflock`` keep them to one node; a file system without locks (``ENOLCK``, ``ENOSYS``) is reported
in one warning and the run goes on unlocked. The lock file is removed when the run ends normally.

Example::

    >>> lock = take_run_lock(Path("runs/hubert"), env)  # doctest: +SKIP
    >>> release_run_lock()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from s3prl_laser.errors import UserInputError
from s3prl_laser.training.ranks import DistEnv, decided_by_rank0

logger = logging.getLogger("s3prl_laser.finetune")

LOCK_NAME = "run.lock"
_BUSY = (errno.EACCES, errno.EAGAIN)  # another process holds the lock
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # the file system has no locks


class RunLockedError(UserInputError):
    """``--out`` is held by another live run."""


class RunLock:
    """The lock of one run folder, held by this process (see the module docstring)."""

    def __init__(self, out: Path, fd: int | None, created: list[Path]) -> None:
        self.out, self.fd, self.created = out, fd, created

    @property
    def path(self) -> Path:
        return self.out / LOCK_NAME

    def release(self) -> None:
        """Remove the lock file (while still holding the lock), then release it; remove the folders that
        taking the lock created if nothing else was written in them."""
        if self.fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if _same_file(self.fd, self.path):
                    self.path.unlink()
        finally:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


_held: list[RunLock] = []


def holder_line() -> str:
    """What the lock file says about its holder: host, pid, SLURM job id (if any), since when (UTC)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job, "since": since})


def describe_holder(text: str) -> str:
    """``host H, pid P, SLURM job J, since T`` from a lock file's content (tolerant of damage)."""
    try:
        holder = json.loads(text.strip().splitlines()[0])
        parts = [f"host {holder['host']}", f"pid {holder['pid']}"]
        if holder.get("slurm_job"):
            parts.append(f"SLURM job {holder['slurm_job']}")
        parts.append(f"since {holder['since']}")
        return ", ".join(parts)
    except (IndexError, ValueError, KeyError, TypeError):
        return "holder not recorded yet (it is starting)"


def try_lock(out: Path) -> RunLock:
    """Take the lock of ``out`` for this process (creating ``out`` if needed); ``RunLockedError`` naming
    the holder when another live process has it."""
    import fcntl

    created = []
    folder = out.absolute()
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    out.mkdir(parents=True, exist_ok=True)
    created.reverse()
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as for open()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in _NO_LOCKS:
                os.close(fd)
                logger.warning(
                    "--out %s: its file system offers no file locks (%s): nothing stops a second run from "
                    "writing into this run folder; see docs/cluster.md", out, os.strerror(error.errno),
                )  # fmt: skip
                return RunLock(out, None, [])
            try:
                text = _holder_text(fd) if error.errno in _BUSY else ""
            finally:
                os.close(fd)
            if error.errno not in _BUSY:
                raise
            raise RunLockedError(
                f"--out {out} is in use by another run ({describe_holder(text)}; lock file {path}): wait for "
                "it to end, or choose another --out"
            ) from None
        if _same_file(fd, path):  # not a lock file that its last holder removed just before we locked it
            break
        os.close(fd)
    left = os.pread(fd, 4096, 0).decode(errors="replace")
    if left.strip():  # a holder that ended without removing the file: killed, or its node lost
        logger.info("--out %s: taking over the lock of a run that ended (%s)", out, describe_holder(left))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_line() + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(out, fd, created)


def _holder_text(fd: int, tries: int = 20) -> str:
    """The holder's line in the lock file; a holder that has just taken the lock writes it a moment later,
    so an empty file is read again a few times (50 ms apart)."""
    for _ in range(tries):
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        if text.strip():
            return text
        time.sleep(0.05)
    return text


def take_run_lock(out: Path, env: DistEnv) -> None:
    """Rank 0 takes the lock of ``out`` (:func:`try_lock`) and keeps it until :func:`release_run_lock`; every
    rank then raises the same ``RunLockedError`` when it is held by another run, so that the refused run
    exits 2 on every rank before any of them writes."""
    decided_by_rank0(env, f"taking the lock of {out}", lambda: _held.append(try_lock(out)), RunLockedError)


def release_run_lock() -> None:
    """Release the run folder locks this process holds (none: nothing happens)."""
    while _held:
        _held.pop().release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
