"""The processes of a local federation: its record, finding them, stopping them by PID.

Every process `up` starts is recorded in `DIR/federation.json` with its PID and start time (a PID
alone may belong to another process by the time `down` runs), and carries
`FLOWERTUNE_FEDERATION_DIR=DIR` in its environment, which its children (SuperExec,
`flwr-serverapp`, `flwr-clientapp`) inherit: so `down` finds exactly these, orphans included,
and never a process someone else started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from flowertune_nlp.flower_home import free_port as probe_free_port
from flowertune_nlp.io import atomic_write_json
from flowertune_nlp.processes import terminate_then_kill

LOOPBACK = "127.0.0.1"
MARKER = "FLOWERTUNE_FEDERATION_DIR"  # in the environment of everything a federation starts
RECORD = "federation.json"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    """Flower's logs colour their level names; tests and messages want the plain text."""
    return _ANSI.sub("", text)


class FederationError(RuntimeError):
    """A component of the federation failed; the message names it and its log file."""


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port nobody listens on now (the kernel's pick for port 0), not in `taken`."""
    for _ in range(50):
        port = probe_free_port()
        if not taken or port not in taken:
            if taken is not None:
                taken.add(port)
            return port
    raise FederationError("could not find a free TCP port on 127.0.0.1")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def recorded_process(entry: Mapping[str, Any]) -> psutil.Process | None:
    """The process `entry` recorded, if it still runs; None if its PID is gone or now
    belongs to another process (a different start time)."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["create_time"])) > 0.05:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def marked_processes(directory: Path) -> list[psutil.Process]:
    """Every live process started by the federation in `directory`, or by one of its
    processes, found by the marker in its environment (so also orphans)."""
    directory = str(Path(directory).resolve())
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.environ().get(MARKER) == directory
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(proc)
    return found


def describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    return f"pid {proc.pid}"


def read_record(directory: Path) -> dict[str, Any]:
    """The federation record in `directory` ({} if there is none)."""
    try:
        return json.loads((Path(directory) / RECORD).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise FederationError(f"cannot read {Path(directory) / RECORD}: {err}") from None


def _tree(entries: Sequence[Mapping[str, Any]]) -> dict[int, psutil.Process]:
    """The still-running recorded processes with all their descendants."""
    family: dict[int, psutil.Process] = {}
    for entry in entries:
        root = recorded_process(entry)
        if root is None:
            continue
        family[root.pid] = root
        with contextlib.suppress(psutil.Error):
            family.update({p.pid: p for p in root.children(recursive=True)})
    return family


def stop_federation(directory: Path, grace: float = 10.0) -> list[str]:
    """Stop everything the federation in `directory` started (recorded processes, their
    process trees, and any process carrying its marker); return what is still alive (empty
    when all is stopped). Safe to call again.

    SuperNodes go first, while the SuperLink (and the Fleet proxy in front of it) can still
    take their goodbye: a node that vanishes without one stays "online" in the SuperLink's
    database for 60 s (2 x 30 s heartbeat), and a SuperLink restarted on that database refuses
    the node until then. Then the proxy, then the SuperLink and whatever is left.
    """
    directory = Path(directory).resolve()
    record = read_record(directory)
    entries = record.get("processes", [])
    nodes = [e for e in entries if e.get("role") not in ("superlink", "proxy")]
    proxies = [e for e in entries if e.get("role") == "proxy"]
    for stage in (nodes, proxies):
        if family := _tree(stage):
            terminate_then_kill(list(family.values()), grace)
    for _ in range(3):  # a SuperExec may start a ClientApp while we stop it: look again
        family = _tree(entries)
        family.update({p.pid: p for p in marked_processes(directory)})
        if not family:
            break
        terminate_then_kill(list(family.values()), grace)
    left = marked_processes(directory)
    left += [p for p in _tree(entries).values() if p.pid not in {q.pid for q in left}]
    if record:
        record.update(state="stopped" if not left else "stop-failed", stopped_at=now())
        atomic_write_json(directory / RECORD, record, private=True)
    return [describe(p) for p in left]


def log_tail(log: Path, lines: int = 8) -> str:
    """The last lines of a log worth showing in an error message (no uvicorn chatter)."""
    try:
        text = strip_ansi(log.read_text(errors="replace"))
    except OSError:
        return ""
    keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("INFO:")]
    return "\n".join("    " + ln for ln in keep[-lines:])


def federation_status(directory: Path) -> dict[str, Any]:
    """What the record in `directory` says, with each process's liveness and the processes
    it started (SuperExec, ServerApp, ClientApps) checked now."""
    record = read_record(Path(directory).resolve())
    seen: set[int] = set()
    for entry in record.get("processes", []):
        proc = recorded_process(entry)
        entry["running"] = proc is not None
        children = []
        if proc is not None:
            seen.add(proc.pid)
            with contextlib.suppress(psutil.Error):
                children = proc.children(recursive=True)
        seen.update(c.pid for c in children)
        entry["children"] = [describe(c) for c in children]
    record["stray"] = [describe(p) for p in marked_processes(Path(directory))
                       if p.pid not in seen]
    return record
