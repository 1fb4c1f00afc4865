"""Claims on sweep runs, so that worker processes sharing a sweep never train the same run twice.

A claim is an exclusive ``fcntl.flock`` on ``<run_dir>/.claim``, held while a worker trains the run.
The operating system drops it when the holder exits for any reason, so an interrupted sweep needs
no clean-up: a run without ``results.json`` and without a live claim is simply claimed again (and
the sweep resumes). A finished run is one with ``results.json``; it is never claimed.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from polar_mem_mamba.config import Config

CLAIM_NAME = ".claim"


def is_done(config: Config) -> bool:
    return (config.run_dir / "results.json").is_file()


class Claim:
    """An exclusive claim on one run; :meth:`release` (or process exit) gives it back."""

    def __init__(self, config: Config, fd: int) -> None:
        self.config, self._fd = config, fd

    @classmethod
    def take(cls, config: Config) -> Claim | None:
        """The claim on ``config``'s run, or None if it is finished or another process holds it."""
        if is_done(config):
            return None
        path = Path(config.run_dir) / CLAIM_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if is_done(config):  # finished by another worker between the check and the lock
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(config, fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
