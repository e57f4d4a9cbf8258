"""Who may read what a run and a federation write: files with secrets are 0600 in 0700 folders
from their first byte on, ordinary outputs stay readable, and git cannot pick up credentials."""

import os
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from flowertune_nlp.io import (
    atomic_write_bytes,
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
    private_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def modes_when_written(monkeypatch) -> list[int]:
    """The mode of every regular file at the moment its bytes are fsynced, before the rename
    makes it visible under its name; and no write may touch the process's umask (another
    thread's file would be created under the cleared one)."""
    seen, fsync = [], os.fsync

    def spy(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            seen.append(stat.S_IMODE(info.st_mode))
        fsync(fd)

    def refuse(_mask: int) -> int:
        raise AssertionError("io.py changed the umask")

    monkeypatch.setattr(os, "fsync", spy)
    set_umask = os.umask
    previous = set_umask(0o022)
    monkeypatch.setattr(os, "umask", refuse)
    try:
        yield seen
    finally:
        set_umask(previous)


def test_private_files_are_owner_only_from_their_first_byte(tmp_path, modes_when_written):
    secret = tmp_path / "new" / "ca.key"
    atomic_write_bytes(secret, b"key", private=True)
    assert (mode(secret), mode(secret.parent), modes_when_written) == (0o600, 0o700, [0o600])
    shared = tmp_path / "shared"
    shared.mkdir()
    atomic_write_text(shared / "token", "t", private=True)
    atomic_write_json(shared / "record.json", {"token": "t"}, private=True)
    # A private file's existing folder is the caller's (private_dir makes it 0700).
    assert (mode(shared / "token"), mode(shared / "record.json"), mode(shared)) == (
        0o600, 0o600, 0o755)
    ordinary = tmp_path / "out" / "run.json"
    atomic_write_json(ordinary, {})
    assert (mode(ordinary), mode(ordinary.parent)) == (0o644, 0o755)
    atomic_write_bytes(ordinary, b"{}", private=True)  # replacing a readable file
    assert mode(ordinary) == 0o600 and ordinary.read_bytes() == b"{}"
    assert modes_when_written[-1] == 0o600


def test_private_dir_creates_or_narrows_a_folder_to_its_owner(tmp_path, modes_when_written):
    made = private_dir(tmp_path / "a" / "credentials")
    assert (mode(made), mode(made.parent)) == (0o700, 0o755)
    existing = tmp_path / "fed"
    existing.mkdir(mode=0o755)
    assert private_dir(existing) == existing and mode(existing) == 0o700


def test_a_folder_written_whole_gets_one_mode_whatever_its_writer_chose(tmp_path,
                                                                         modes_when_written):
    def fill(staging: Path) -> None:
        (staging / "adapter_model.safetensors").write_bytes(b"x")
        (staging / "adapter_model.safetensors").chmod(0o600)  # as safetensors writes it
        (staging / "adapter_config.json").write_text("{}")  # 0644 under umask 022

    atomic_write_dir(tmp_path / "peft_1", fill)
    assert mode(tmp_path / "peft_1") == 0o755
    assert {p.name: mode(p) for p in (tmp_path / "peft_1").iterdir()} == {
        "adapter_model.safetensors": 0o644, "adapter_config.json": 0o644}
    atomic_write_dir(tmp_path / "state", fill, private=True)
    assert mode(tmp_path / "state") == 0o700
    assert {mode(p) for p in (tmp_path / "state").iterdir()} == {0o600}


def test_a_strict_umask_is_kept_for_ordinary_files(tmp_path, monkeypatch):
    with umask(0o077):
        atomic_write_text(tmp_path / "metrics.jsonl", "{}\n")
        atomic_write_dir(tmp_path / "peft_1", lambda d: (d / "a.json").write_text("{}"))
    assert mode(tmp_path / "metrics.jsonl") == 0o600
    assert (mode(tmp_path / "peft_1"), mode(tmp_path / "peft_1" / "a.json")) == (0o700, 0o600)


def test_git_cannot_add_credentials_keys_or_the_superlink_database(tmp_path):
    """Paths as the README and docs make them: `up --dir fed`, `credentials --out creds` (or
    any other folder), ssh-keygen's `keys/`, the SuperLink's `--database state.db`."""
    from flowertune_nlp.federation.credentials import make_credentials

    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    made = make_credentials(tmp_path / "any", nodes=2).directory
    names = sorted(p.name for p in made.iterdir())
    private = [p.name for p in made.iterdir() if mode(p) & 0o077 == 0]  # what only it may read
    assert {"ca.key", "server.key", "node-1", "node-2"} <= set(private)
    paths = ([f"fed/{n}" for n in names] + [f"creds/{n}" for n in names]
             + [f"any/where/{n}" for n in private]
             + ["fed/state.db", "fed/flwr-home/config.toml", "fed/logs/superlink.log",
                "keys/hospital-a", "keys/hospital-a.pub", "site/state.db", "site/state.db-wal"])
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", *paths],
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(paths)
    # ... and no tracked file is covered by these patterns.
    tracked_ignored = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached",
                                      "--ignored", "--exclude-standard"],
                                     capture_output=True, text=True, check=True).stdout
    assert tracked_ignored == ""
