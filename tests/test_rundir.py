"""Run directories written by one process at a time (``binaryconnect.rundir``): claims of new runs, holds of
resumes, left-over claims of killed processes, filesystems without locks, and many processes at once."""

import errno
import fcntl
import os
import subprocess
import sys

import pytest

from binaryconnect import rundir
from binaryconnect.cli import main
from binaryconnect.errors import ConfigError


def _held_elsewhere(path):
    """A claim file locked through another open file description, as another process holds it."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_resume_is_refused_while_another_process_holds_the_run(tmp_path, capsys):
    """A run still training (or a resume, or a sweep's run a repeated sweep would resume) holds its directory:
    `train --resume` is refused in one line and leaves the claim alone; once it is free, the resume holds it
    and removes it at the end."""
    run = tmp_path / "run"
    run.mkdir()
    fd = _held_elsewhere(run / rundir.CLAIM)
    assert main(["train", "--resume", str(run)]) == 2
    assert f"{run} is in use: another binaryconnect process is training it" in capsys.readouterr().err
    assert (run / rundir.CLAIM).exists()
    os.close(fd)
    held = rundir.hold(run)  # free now: held (and the nothing-to-resume error then comes from resume itself)
    with pytest.raises(ConfigError, match="is in use"):
        rundir.hold(run)
    held.release()
    assert not (run / rundir.CLAIM).exists()


def test_a_left_over_claim_and_a_cut_short_write_beside_it_are_taken_over(tmp_path):
    """SIGKILL during a new run's first checkpoint write leaves the claim (held by no one) and the write's temp
    file: the next start takes the directory, both gone; a directory with a run in it is refused, claim or
    not, and keeps its files."""
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CLAIM).touch()
    (run / ".checkpoint.safetensors.a18mho6p.tmp").write_bytes(b"partial")
    assert rundir.unstarted(run)
    claim = rundir.claim_new(run, numbered=False)
    assert sorted(f.name for f in run.iterdir()) == [rundir.CLAIM]
    claim.release()
    assert not run.exists()  # a run that wrote nothing leaves no directory (one given empty included)

    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"x")
    (run / rundir.CLAIM).touch()
    with pytest.raises(ConfigError, match=r"already holds a run; choose another --out, or continue that run with "
                                          r"`binaryconnect train --resume"):
        rundir.claim_new(run, numbered=False)
    assert sorted(f.name for f in run.iterdir()) == ["checkpoint.safetensors"]
    assert not rundir.unstarted(run)


def test_without_file_locks_the_exclusive_creation_is_the_claim(tmp_path, monkeypatch):
    """A filesystem that refuses flock (ENOLCK, as some NFS mounts): a new run still starts, with a warning;
    a second start there is refused, as is a left-over claim (it cannot be told from a live one)."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="this filesystem has no file locks"):
        claim = rundir.claim_new(tmp_path / "a" / "run", numbered=False)
    with pytest.raises(ConfigError, match="this filesystem has no file locks"):
        rundir.claim_new(tmp_path / "a" / "run", numbered=False)
    claim.release()
    assert not (tmp_path / "a").exists()  # the folders made for it went with it


RACE = r"""
import os, sys, time
from pathlib import Path
from binaryconnect import rundir
from binaryconnect.errors import ConfigError
root, numbered = Path(sys.argv[1]), sys.argv[2] == "1"
claimed = 0
for i in range(150):
    try:
        claim = rundir.claim_new(root / "runs" / "x", numbered=numbered)
    except ConfigError as exc:
        assert "is in use" in str(exc) or "not empty" in str(exc), exc
        continue
    marker = root / ("owner-" + claim.run_dir.name)  # two owners of one directory at once: this fails
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    time.sleep(0.0005)
    os.close(fd)
    os.unlink(marker)
    claim.release()  # as a start that failed: the directory it made goes
    claimed += 1
print(claimed)
"""


@pytest.mark.parametrize("numbered", [False, True], ids=["same-out", "default-names"])
def test_many_starts_at_once_never_share_a_directory(tmp_path, numbered):
    """Three processes, each claiming and releasing one directory 150 times as fast as they can, as failing
    starts do (the directory made and removed each time): never two owners at once, no error, no run
    directory left (their parent folder may be: a start that made it can find another start inside it).
    (Before: a lock taken on a claim file another start had just removed gave two owners.)"""
    processes = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(int(numbered))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, results, strict=True):
        assert p.returncode == 0, err
    assert sum(int(out) for out, _ in results) > 0
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_resume_leaves_its_directory_and_reads_a_read_only_one(tmp_path, monkeypatch):
    """A resume's hold removes only its claim, never the directory (an empty one included); a directory it
    cannot write is not held (nothing will write there: a finished run on a read-only disk)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    rundir.hold(empty).release()
    assert empty.is_dir()

    def denied(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(rundir.os, "open", denied)
    assert rundir.hold(empty) is None


def test_temp_files_without_a_claim_and_odd_out_paths(tmp_path, monkeypatch):
    """A cut-short write's temp file left alone (its claim removed by a failed resume) does not block a new
    run; a broken symbolic link as --out, and a folder name the system refuses, say so and leave nothing."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint.safetensors.x1.tmp").write_bytes(b"partial")
    rundir.claim_new(run, numbered=False).release()
    assert not run.exists()
    (tmp_path / "dangle").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is a broken symbolic link, not a directory"):
        rundir.claim_new(tmp_path / "dangle", numbered=False)
    with pytest.raises(OSError):
        rundir.claim_new(tmp_path / "new" / ("a" * 300), numbered=False)
    assert not (tmp_path / "new").exists()


def test_without_file_locks_a_left_over_claim_is_named(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rundir.CLAIM).touch()
    with pytest.raises(ConfigError, match=r"exists and this filesystem has no file locks .* delete .*"
                                          r"\.binaryconnect-starting and try again"):
        rundir.hold(tmp_path / "run")
