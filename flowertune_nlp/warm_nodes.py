"""Warm nodes: one long-lived worker process per SuperNode that keeps the imported stack and the
loaded base model, so a deployment round stops paying for what Flower 1.42's fresh
`flwr-clientapp` process per message costs (importing torch, transformers and TRL, loading the
model again; DESIGN §7.2).

The ClientApp process of a message stays thin (no torch): it finds its SuperNode among its
ancestors, makes sure that node's worker runs this message's app code and base model (a worker
of another app version or model is stopped and replaced), hands it the message and context over
a Unix socket in a folder only this user can enter, and returns its reply. The worker
(`warm_worker.py`) runs the very handlers a cold ClientApp runs, one message at a time, and
exits with its SuperNode, after `warm-idle-seconds` without a message, or on SIGTERM.

Node config (`flower-supernode --node-config`): `warm=false` runs every message in Flower's fresh
process, as without this module; `warm-idle-seconds` (default 900). Without a `flower-supernode`
ancestor (simulation, whose Ray actors already outlive a round) messages run in-process.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from flowertune_nlp.io import atomic_write_json
from flowertune_nlp.logs import use_flower_log_handlers

if TYPE_CHECKING:  # Flower is imported where a message is handled: the CLI needs none of it
    from flwr.app import Context, Message

log = logging.getLogger(__name__)

WARM_KEY = "warm"  # node-config: false = every message in a fresh process
IDLE_KEY = "warm-idle-seconds"  # node-config: the worker exits after this long without work
DEFAULT_IDLE_SECONDS = 900.0
WORKER_ENV = "FLOWERTUNE_WARM_WORKER"  # set in the worker: its handlers do the work themselves
SUPERNODE = "flower-supernode"
START_TIMEOUT = 300.0  # from start until the worker accepts on its socket
STOP_GRACE = 10.0
SOCKET_NAME, RECORD_NAME, LOCK_NAME = "worker.sock", "worker.json", "lock"
# Libraries whose version is part of the worker's identity (same venv path, upgraded packages).
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "flwr", "bitsandbytes",
             "datasets", "flwr-datasets")
_FRAME = struct.Struct("!Q")
TIMING_PREFIX = "warm node timing:"


class WarmWorkerError(RuntimeError):
    """The node's worker could not take the message, or ended while it worked on it."""


class NotTaken(WarmWorkerError):
    """The worker ended before it took the message: the message can go to a new worker."""


def node_settings(node_config: Mapping[str, Any]) -> tuple[bool, float]:
    """(warm, idle seconds) from the operator's node config; ValueError naming the key."""
    warm = node_config.get(WARM_KEY, True)
    if not isinstance(warm, bool):
        raise ValueError(f"node-config {WARM_KEY} = {warm!r}: write {WARM_KEY}=true or "
                         f"{WARM_KEY}=false (without quotes)")
    idle = node_config.get(IDLE_KEY, DEFAULT_IDLE_SECONDS)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or not idle > 0:
        raise ValueError(f"node-config {IDLE_KEY} = {idle!r}: give a number of seconds > 0, "
                         f"e.g. {IDLE_KEY}=900")
    return warm, float(idle)


def owning_supernode() -> psutil.Process | None:
    """The `flower-supernode` process this ClientApp process descends from, if any."""
    for proc in psutil.Process().parents():
        with contextlib.suppress(psutil.Error):
            if any(Path(word).name == SUPERNODE for word in proc.cmdline()[:2]):
                return proc
    return None


def warm_node(context: Context) -> WarmNode | None:
    """The node's warm worker for this message, or None where the message runs here: inside the
    worker itself, with `warm=false`, or without a SuperNode above this process."""
    if os.environ.get(WORKER_ENV):
        return None
    warm, idle = node_settings(context.node_config)
    if not warm:
        return None
    owner = owning_supernode()
    return WarmNode(owner, idle_seconds=idle) if owner is not None else None


# ---------------------------------------------------------------------------------------------
# what the worker must match: the app's code and environment, and the base model


def package_root() -> Path:
    """The folder holding the `flowertune_nlp` package this process imported (the run's
    installed app in a deployment); the worker imports from the same folder."""
    return Path(__file__).resolve().parents[1]


@functools.cache
def _environment() -> bytes:
    """The interpreter and the versions of the libraries that train."""
    parts = [sys.executable, sys.version]
    for library in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{library}={importlib.metadata.version(library)}")
    return "\0".join(parts).encode()


def code_digest(root: Path) -> str:
    """Hash of the package's source files under `root` and of the environment: a worker from
    another app version or environment differs."""
    digest = hashlib.sha256(_environment())
    package = root / "flowertune_nlp"
    for path in sorted(package.rglob("*.py")):
        digest.update(b"\0" + str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def identity(run_config: Mapping[str, Any], root: Path | None = None) -> str:
    """What a worker must match to take a run's messages: the app's code digest and the base
    model settings (`model.*`) of the run."""
    model = sorted((k, repr(v)) for k, v in run_config.items() if k.startswith("model."))
    text = code_digest(root or package_root()) + json.dumps(model)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# the channel: a Unix socket in a folder only this user can enter, length-prefixed frames


def default_base() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    parent = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
    return parent / f"flowertune-warm-{os.getuid()}"


def private_folder(path: Path) -> Path:
    """`path` as a folder that is this user's and 0700 (created so); refuse one that is a link,
    someone else's, or open to others, since a worker there runs whatever it is sent."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WarmWorkerError(f"{path} must be a folder of user {os.getuid()} with mode 0700 "
                              "(not a link); remove it, or set XDG_RUNTIME_DIR to a private "
                              "folder")
    return path


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(_FRAME.pack(len(frame)) + frame)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = _FRAME.unpack(_recv_exactly(sock, _FRAME.size))
    return _recv_exactly(sock, size)


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (Linux); None elsewhere."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return uid


def exception_header(err: BaseException) -> dict[str, Any]:
    """An exception as the worker sends it back, so the ClientApp can raise the same one."""
    try:
        args = json.loads(json.dumps(err.args))
    except (TypeError, ValueError):
        args = [str(err)]
    return {"ok": False, "module": type(err).__module__, "type": type(err).__qualname__,
            "args": args, "message": str(err)}


def rebuild_exception(header: Mapping[str, Any]) -> Exception:
    """The worker's exception, of the same type where this process has that type loaded (so
    Flower's error reply reads as a cold node's would); else a WarmWorkerError naming it."""
    module = sys.modules.get(header["module"])
    kind = getattr(module, header["type"], None) if module else None
    if isinstance(kind, type) and issubclass(kind, Exception):
        with contextlib.suppress(Exception):
            return kind(*header["args"])
    return WarmWorkerError(f"{header['type']}: {header['message']}")


# ---------------------------------------------------------------------------------------------
# the node's worker, from the ClientApp's side


def ending(proc: psutil.Process) -> str:
    """How a worker ended, where this process can tell (it started it), else a guess."""
    with contextlib.suppress(psutil.Error, subprocess.TimeoutExpired, ChildProcessError):
        code = proc.wait(timeout=2)
        if code is not None:
            return (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
    return "killed, out of memory or crashed"


@dataclass(frozen=True)
class WorkerRecord:
    pid: int
    create_time: float
    identity: str


class WarmNode:
    """The worker of the SuperNode `owner`: its folder `<base>/<pid>-<start time>` holds the
    socket, a record of the worker (pid, start time, identity) and a lock that lets one
    ClientApp process at a time start or replace it."""

    def __init__(self, owner: psutil.Process, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 base: Path | None = None) -> None:
        self.owner = owner
        self.owner_created = owner.create_time()
        self.idle_seconds = idle_seconds
        base = private_folder(base or default_base())
        self.folder = private_folder(base / f"{owner.pid}-{int(self.owner_created * 1000)}")
        self.socket_path = self.folder / SOCKET_NAME
        if len(str(self.socket_path).encode()) > 100:
            raise WarmWorkerError(f"socket path {self.socket_path} is too long for a Unix "
                                  "socket; set XDG_RUNTIME_DIR to a shorter private folder")
        self.record_path = self.folder / RECORD_NAME

    # -- the worker process ----------------------------------------------------------------

    def record(self) -> WorkerRecord | None:
        try:
            return WorkerRecord(**json.loads(self.record_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def worker(self) -> tuple[psutil.Process, WorkerRecord] | None:
        """The recorded worker, if it still runs (same pid and start time, not a zombie)."""
        record = self.record()
        if record is None:
            return None
        try:
            proc = psutil.Process(record.pid)
            if (abs(proc.create_time() - record.create_time) > 0.05
                    or proc.status() == psutil.STATUS_ZOMBIE):
                return None
        except psutil.Error:
            return None
        return proc, record

    @contextlib.contextmanager
    def _locked(self):
        with open(self.folder / LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure(self, run_config: Mapping[str, Any]) -> tuple[psutil.Process, str]:
        """The node's worker for this run's app and model: the running one if it matches,
        else a new one (a mismatching one is stopped first). Returns it and its identity."""
        wanted = identity(run_config)
        with self._locked():
            found = self.worker()
            if found is not None and found[1].identity == wanted:
                return found[0], wanted
            if found is not None:
                log.info("warm worker pid %d runs another app version or base model; "
                         "replacing it", found[0].pid)
                self._stop(found[0])
            return self._start(wanted, run_config), wanted

    def _start(self, wanted: str, run_config: Mapping[str, Any]) -> psutil.Process:
        self.socket_path.unlink(missing_ok=True)
        root = package_root()
        env = {**os.environ, WORKER_ENV: "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                           os.environ.get("PYTHONPATH")]))}
        # -P: no working folder on sys.path, so the package comes from `root` alone (the
        # working folder is the ClientApp's, for relative paths in the run's config).
        command = [sys.executable, "-P", "-m", "flowertune_nlp.warm_worker", "--folder",
                   str(self.folder), "--owner", str(self.owner.pid), "--owner-created",
                   repr(self.owner_created), "--identity", wanted, "--idle-seconds",
                   repr(self.idle_seconds)]
        # Output goes where this ClientApp's goes (the SuperNode's log).
        process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(json.dumps(dict(run_config)).encode())
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        proc = psutil.Process(process.pid)
        atomic_write_json(self.record_path, {"pid": proc.pid, "create_time": proc.create_time(),
                                             "identity": wanted}, private=True)
        log.info("started warm worker pid %d for SuperNode pid %d (idle limit %.0f s)",
                 proc.pid, self.owner.pid, self.idle_seconds)
        return proc

    def _stop(self, proc: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs([proc], timeout=STOP_GRACE)
        for left in alive:
            with contextlib.suppress(psutil.Error):
                left.kill()
        psutil.wait_procs(alive, timeout=5)

    def stop(self) -> bool:
        """Stop the node's worker if one runs; whether one did."""
        with self._locked():
            found = self.worker()
            if found is not None:
                self._stop(found[0])
            return found is not None

    def prestart(self, run_config: Mapping[str, Any]) -> None:
        """Start the worker without waiting for it, so that its imports and model load overlap
        the server's next steps (the query before a node's first train message)."""
        self.ensure(run_config)

    # -- a message ---------------------------------------------------------------------------

    def _connect(self, proc: psutil.Process) -> socket.socket:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                raise NotTaken(f"the node's warm worker (pid {proc.pid}) ended before it took "
                               f"the message ({ending(proc)}); see the SuperNode's log")
            if time.monotonic() > deadline:
                raise WarmWorkerError(f"the node's warm worker (pid {proc.pid}) did not open "
                                      f"{self.socket_path} within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def _exchange(self, msg: Message, context: Context) -> dict[str, Any] | bytes:
        """One attempt: the worker's reply header, or the reply content's bytes."""
        from flwr.common.serde import context_to_proto, message_to_proto

        proc, wanted = self.ensure(context.run_config)
        kind = msg.metadata.message_type
        with self._connect(proc) as sock:
            try:
                send_frames(sock, json.dumps({"identity": wanted}).encode(),
                            message_to_proto(msg).SerializeToString(),
                            context_to_proto(context).SerializeToString())
                recv_frame(sock)  # the worker took the message
            except (EOFError, ConnectionError) as err:
                raise NotTaken(f"the node's warm worker (pid {proc.pid}) ended before it took "
                               f"the message ({ending(proc)}; {err})") from None
            try:
                header = json.loads(recv_frame(sock))
                if header.get("ok") and "error" not in header:
                    return recv_frame(sock)
                return header
            except (EOFError, ConnectionError) as err:
                raise WarmWorkerError(
                    f"the node's warm worker (pid {proc.pid}) ended during the {kind} message "
                    f"({ending(proc)}; {err}; see the SuperNode's log); this message fails, the "
                    "next one starts a new worker") from None

    def forward(self, msg: Message, context: Context) -> Message:
        """Have the node's worker handle `msg`; its reply (or its exception, raised here). A
        worker that ends before it takes the message (its idle limit, a crash between messages)
        is replaced and the message handed to the new one, once."""
        from flwr.app import Error, Message
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        handed_over = time.time()
        use_flower_log_handlers()
        try:
            reply = self._exchange(msg, context)
        except NotTaken as err:
            log.warning("%s; handing the message to a new worker", err)
            reply = self._exchange(msg, context)
        started = psutil.Process().create_time()
        # Where a message's time goes on this node (bench/deployment_vs_simulation.py reads it)
        log.info("%s %s message: waited %.2f s for its process (server to process start), "
                 "%.2f s to reach the worker (process start-up), %.2f s in the worker",
                 TIMING_PREFIX, msg.metadata.message_type, started - msg.metadata.created_at,
                 handed_over - started, time.time() - handed_over)
        if isinstance(reply, bytes):
            return Message(content=recorddict_from_proto(ProtoRecordDict.FromString(reply)),
                           reply_to=msg)
        if not reply.get("ok"):
            raise rebuild_exception(reply)
        return Message(Error(code=int(reply["error"]["code"]),
                             reason=str(reply["error"]["reason"])), reply_to=msg)
