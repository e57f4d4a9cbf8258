"""The warm worker of one SuperNode: started by `warm_nodes.WarmNode` (never by hand), it imports
the training stack and loads the run's base model once, then runs the ClientApp's own train and
evaluate handlers for the messages the node's thin ClientApp processes hand it, one at a time.

    python -m flowertune_nlp.warm_worker --folder F --owner PID --owner-created T \\
        --identity I --idle-seconds S        (the run config as JSON on stdin)

It refuses to start when its code or the run's base model does not give `--identity` (the app
that started it is another version), accepts only connections from its own user on a socket in
its 0700 folder, and exits when the SuperNode `--owner` is gone, after `--idle-seconds` without
a message, or on SIGTERM/SIGINT, removing its socket and record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
from flwr.app import Context, Message, MessageType

from flowertune_nlp.logs import use_flower_log_handlers
from flowertune_nlp.warm_nodes import (
    LOCK_NAME,
    RECORD_NAME,
    SOCKET_NAME,
    WarmWorkerError,
    exception_header,
    identity,
    peer_uid,
    private_folder,
    recv_frame,
    send_frames,
)

log = logging.getLogger(__name__)
OWNER_POLL_SECONDS = 0.5
EXIT_IDENTITY_MISMATCH = 3


def handlers() -> dict[str, Callable[[Message, Context], Message]]:
    """The ClientApp's own handlers, by message type (queries stay in the thin process)."""
    from flowertune_nlp import client_app

    return {MessageType.TRAIN: client_app.train, MessageType.EVALUATE: client_app.evaluate}


class Worker:
    def __init__(self, folder: Path, owner: int, owner_created: float, wanted: str,
                 idle_seconds: float) -> None:
        self.folder, self.owner, self.owner_created = folder, owner, owner_created
        self.identity, self.idle_seconds = wanted, idle_seconds
        self.socket_path = folder / SOCKET_NAME
        self.listener: socket.socket | None = None

    def owner_alive(self) -> bool:
        try:
            proc = psutil.Process(self.owner)
            return (abs(proc.create_time() - self.owner_created) < 0.05
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def cleanup(self) -> None:
        """Remove the socket, and the record if it is still this worker's."""
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
        record = self.folder / RECORD_NAME
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()

    def watch_owner(self) -> None:
        """Exit at once when the SuperNode is gone (also mid-message: its reply has nowhere
        to go)."""
        while self.owner_alive():
            time.sleep(OWNER_POLL_SECONDS)
        log.info("warm worker pid %d: SuperNode pid %d is gone; exiting", os.getpid(),
                 self.owner)
        self.cleanup()
        with contextlib.suppress(OSError):  # no message of that node can come any more
            (self.folder / LOCK_NAME).unlink()
            self.folder.rmdir()
        os._exit(0)

    def bind(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        self.socket_path.chmod(0o600)
        listener.listen(4)
        listener.settimeout(1.0)
        self.listener = listener

    def serve(self, run: Mapping[str, Callable]) -> None:
        """One connection, one message at a time, until idle for `idle_seconds`."""
        assert self.listener is not None
        last = time.monotonic()
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() - last > self.idle_seconds:
                    log.info("warm worker pid %d: no message for %.0f s; exiting", os.getpid(),
                             self.idle_seconds)
                    return
                continue
            with conn:
                conn.settimeout(None)
                uid = peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    log.warning("warm worker: refused a connection from user %d", uid)
                    continue
                try:
                    self.handle(conn, run)
                except (EOFError, OSError) as err:  # the ClientApp process went away
                    log.warning("warm worker: lost the ClientApp's connection: %s", err)
            last = time.monotonic()

    def handle(self, conn: socket.socket, run: Mapping[str, Callable]) -> None:
        from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage

        header = json.loads(recv_frame(conn))
        message, context = recv_frame(conn), recv_frame(conn)
        send_frames(conn, b"{}")  # taken: from here on, the message is this worker's
        try:
            if header.get("identity") != self.identity:
                raise WarmWorkerError("this warm worker runs another app version or base model "
                                      "than the message's; the next message replaces it")
            msg = message_from_proto(ProtoMessage.FromString(message))
            handler = run.get(msg.metadata.message_type)
            if handler is None:
                raise WarmWorkerError(f"a warm worker does not handle "
                                      f"{msg.metadata.message_type!r} messages")
            reply = handler(msg, context_from_proto(ProtoContext.FromString(context)))
        except Exception as err:
            log.exception("warm worker: the handler raised")
            send_frames(conn, json.dumps(exception_header(err)).encode())
            return
        if reply.has_error():
            send_frames(conn, json.dumps({"ok": True, "error": {
                "code": reply.error.code, "reason": reply.error.reason}}).encode())
            return
        send_frames(conn, b'{"ok": true}', recorddict_to_proto(reply.content).SerializeToString())


def preload(run_config: Mapping[str, Any]) -> None:
    """Import the training stack and load the run's base model before the first message."""
    if not run_config:
        return
    try:
        from flowertune_nlp.config import build_config
        from flowertune_nlp.training import get_client_model

        get_client_model(build_config(run_config))
    except Exception as err:  # the message that needs it reports it
        log.warning("warm worker: could not preload the base model (%s); the first message "
                    "tries again", err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--owner", type=int, required=True, help="the SuperNode's pid")
    parser.add_argument("--owner-created", type=float, required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--idle-seconds", type=float, required=True)
    args = parser.parse_args(argv)
    use_flower_log_handlers()
    run_config = json.loads(sys.stdin.read() or "{}")
    mine = identity(run_config)
    if mine != args.identity:
        print(f"error: this worker's code and model give identity {mine}, not "
              f"{args.identity}: it was started from another app version", file=sys.stderr)
        return EXIT_IDENTITY_MISMATCH
    worker = Worker(private_folder(Path(args.folder)), args.owner, args.owner_created,
                    args.identity, args.idle_seconds)

    def stop(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run = handlers()  # an app that cannot be imported fails here, before taking a message
    try:
        worker.bind()
        threading.Thread(target=worker.watch_owner, daemon=True).start()
        preload(run_config)
        worker.serve(run)
    finally:
        worker.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
