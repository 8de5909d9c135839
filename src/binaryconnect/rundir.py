"""Run directories, written by one process at a time.

A run directory is written by the new run that claims it (``claim_new``) or by the resume that holds it
(``hold``), never by two processes at once. The claim is the file ``.binaryconnect-starting`` in it,
locked with ``flock`` for as long as the process works there and removed when it ends. The lock goes
with the process: a claim left by a killed process is held by no one and is taken over, with the
temporary files a write cut short left beside it. Where the filesystem refuses ``flock`` (some network
filesystems), creating the file exclusively is the claim, with a warning: a claim a killed process left
there has to be removed by hand.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from .checkpoint import TEMP_FILES, remove_stale_temp_files
from .errors import ConfigError

CLAIM = ".binaryconnect-starting"

#: ``flock`` errors that mean "no locks on this filesystem", not "held by another process".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass
class Claim:
    """A run directory held by this process; ``release`` ends it."""

    run_dir: Path
    fd: int
    created: list[Path] = field(default_factory=list)  # parent folders made for it, deepest first
    new: bool = True  # a new run's claim (``claim_new``), not a resume's hold

    def release(self) -> None:
        """Remove the claim (still holding its lock); for a new run, then the run directory if nothing was
        written in it (whoever made it: starts racing for a name may make it for one another) and the parent
        folders made for it."""
        try:
            (self.run_dir / CLAIM).unlink(missing_ok=True)
        finally:
            os.close(self.fd)
        if self.new:
            _remove_empty([self.run_dir, *(f for f in self.created if f != self.run_dir)])


def _take(path: Path) -> tuple[int, bool] | None:
    """Open (creating it) and lock the claim file ``path``: ``(fd, created)``, or None when a live process
    holds it. FileNotFoundError when its folder is gone (removed by a start that failed beside this one)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    for _ in range(100):
        try:
            fd, created = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_WRONLY), False
            except FileNotFoundError:  # removed meanwhile: again
                continue
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "flock unavailable")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            if created:  # no locks here: the exclusive creation alone claims it
                warnings.warn(f"{path.parent}: this filesystem has no file locks; the run directory is claimed by "
                              f"creating {CLAIM} alone (if a killed run leaves it, remove it by hand)", stacklevel=3)
                return fd, created
            os.close(fd)  # cannot tell a live claim from a left-over one
            raise ConfigError(f"{path} exists and this filesystem has no file locks to tell whether a process holds "
                              f"it: if no binaryconnect process is using {path.parent}, delete {path} and try "
                              "again") from None
        try:  # still the file at that path? (another process may have removed it after we opened it)
            now, ours = os.stat(path), os.fstat(fd)
            if (now.st_ino, now.st_dev) == (ours.st_ino, ours.st_dev):
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)
    raise ConfigError(f"could not claim {path.parent}: other processes keep replacing {CLAIM}; try again")


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: one with anything in it stays, and so do the
    rest (its parents)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return those this call created, deepest first (a folder
    another process created meanwhile is not among them)."""
    created: list[Path] = []
    for _ in range(100):
        try:
            for folder in [*reversed(path.parents), path]:
                if folder.is_dir():
                    continue
                try:
                    folder.mkdir()
                    created.append(folder)
                except FileExistsError:
                    pass
            return created[::-1]
        except FileNotFoundError:  # a parent removed meanwhile by the start that made it: again
            continue
        except OSError:  # a name too long, no permission...: what this call made goes
            _remove_empty(created[::-1])
            raise
    raise ConfigError(f"could not create {path}: its folders keep disappearing; try again")


def claim_new(run_dir: Path, numbered: bool) -> Claim:
    """The directory of a new run, claimed: ``run_dir``, created if missing, empty but for a left-over
    claim (and the temp files beside it); unless ``numbered`` (a default name), a directory with files in
    it, or one another process holds, is refused; ``numbered`` tries ``run_dir-2``, ``run_dir-3`` ..."""
    for n in range(1, 1000):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        if candidate.is_file() or (candidate.is_symlink() and not candidate.exists()):
            if numbered:
                continue
            what = "a file" if candidate.is_file() else "a broken symbolic link"
            raise ConfigError(f"--out {run_dir} is {what}, not a directory: choose another --out")
        for _ in range(100):
            created = _make_dirs(candidate)
            try:
                taken = _take(candidate / CLAIM)
                break
            except FileNotFoundError:  # the folder went meanwhile (a failed start beside this one): again
                continue
        else:
            raise ConfigError(f"could not create {candidate}: it keeps disappearing; try again")
        if taken is None:
            _remove_empty(created)  # what this start made for it, unless the holder is inside
            if numbered:
                continue
            raise ConfigError(f"run directory {run_dir} is in use: another binaryconnect process is starting or "
                              "training a run in it; choose another --out")
        claim = Claim(candidate, taken[0], created)
        try:  # held now: the temp files of a write a killed process cut short go (ours by their names)
            remove_stale_temp_files(candidate)
            others = [f.name for f in candidate.iterdir() if f.name != CLAIM]
        except BaseException:
            claim.release()
            raise
        if not others:
            return claim
        claim.created = []
        claim.release()  # it holds a run (or files of its own): they and it stay
        if not numbered:
            if "checkpoint.safetensors" in others:
                raise ConfigError(f"run directory {run_dir} already holds a run; choose another --out, or continue "
                                  f"that run with `binaryconnect train --resume {run_dir}`")
            raise ConfigError(f"{run_dir} already exists and holds files (not a run to resume): choose another --out")
    raise ConfigError(f"{run_dir} and 998 numbered variants of it are taken: choose a --out")


def hold(run_dir: Path) -> Claim | None:
    """Hold the existing run directory ``run_dir`` for a resume; refused while another process holds it
    (a run still training there, a resume running, a sweep's run a repeated sweep would resume). None where
    the directory cannot be written (a finished run on a read-only disk: nothing will write there)."""
    try:
        taken = _take(Path(run_dir) / CLAIM)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise
    if taken is None:
        raise ConfigError(f"{run_dir} is in use: another binaryconnect process is training it; wait for it to end "
                          "(or stop it: it checkpoints), then resume")
    return Claim(Path(run_dir), taken[0], new=False)


def unstarted(path: Path) -> bool:
    """A run directory with nothing of a run in it: only a claim (a run starting, or a start killed before
    it wrote anything) and temp files beside it."""
    try:
        names = [f.name for f in path.iterdir()]
    except OSError:
        return False
    return CLAIM in names and all(n == CLAIM or fnmatch(n, TEMP_FILES) for n in names)
