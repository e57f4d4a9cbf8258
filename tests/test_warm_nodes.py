"""Warm nodes without Flower's processes: the node-config keys, the worker's identity, its private
channel, and its life (start, reuse, replacement, exit with its SuperNode or when idle, death in
the middle of a message). A plain `sleep` process stands in for the SuperNode. The Deployment
Engine runs are in test_warm_deployment.py."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flowertune_nlp import messages as wire
from flowertune_nlp.faults import InjectedFault
from flowertune_nlp.nodes import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from flowertune_nlp.warm_nodes import (
    IDLE_KEY,
    WARM_KEY,
    WarmNode,
    WarmWorkerError,
    exception_header,
    identity,
    node_settings,
    package_root,
    private_folder,
    rebuild_exception,
    warm_node,
)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def base():
    """A short private folder for node folders (a Unix socket path has at most 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="wn-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def owner():
    """A process standing in for the SuperNode; killed at the end whatever the test did."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield psutil.Process(process.pid)
    process.kill()
    process.wait()


def workers_of(owner: psutil.Process) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        words = proc.info["cmdline"] or []
        if ("flowertune_nlp.warm_worker" in words and str(owner.pid) in words
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(proc)
    return found


def test_node_settings_default_on_and_refuse_bad_values():
    assert node_settings({}) == (True, 900.0)
    assert node_settings({WARM_KEY: False, IDLE_KEY: 5}) == (False, 5.0)
    with pytest.raises(ValueError, match="warm=true or warm=false"):
        node_settings({WARM_KEY: "false"})
    with pytest.raises(ValueError, match="warm-idle-seconds"):
        node_settings({IDLE_KEY: 0})
    # no flower-supernode above the test process (as in simulation): the message runs here
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert warm_node(context) is None


def test_identity_follows_the_code_the_model_and_nothing_else(tmp_path):
    root = tmp_path / "app"
    shutil.copytree(package_root() / "flowertune_nlp", root / "flowertune_nlp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = {"model.name": "a", "model.lora.peft-lora-r": 8, "num-server-rounds": 3}
    same = identity(config, root)
    assert same == identity(config, package_root())  # same files elsewhere: same identity
    assert identity({**config, "num-server-rounds": 9}, root) == same
    assert identity({**config, "model.name": "b"}, root) != same
    assert identity({**config, "model.lora.peft-lora-r": 16}, root) != same
    with open(root / "flowertune_nlp" / "training.py", "a") as handle:
        handle.write("# another app version\n")
    assert identity(config, root) != same


def test_private_folder_refuses_a_folder_others_can_enter(tmp_path):
    folder = private_folder(tmp_path / "mine")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(WarmWorkerError, match="mode 0700"):
        private_folder(open_folder)
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(WarmWorkerError, match="not a link"):
        private_folder(tmp_path / "link")


def test_exceptions_come_back_with_their_type():
    err = rebuild_exception(json.loads(json.dumps(exception_header(KeyError("x")))))
    assert type(err) is KeyError and str(err) == "'x'"
    err = rebuild_exception(exception_header(InjectedFault("injected failure")))
    assert type(err) is InjectedFault and str(err) == "injected failure"
    header = {**exception_header(ValueError("v")), "module": "not.loaded.here", "type": "Odd"}
    err = rebuild_exception(header)
    assert type(err) is WarmWorkerError and str(err) == "Odd: v"


def test_worker_is_reused_replaced_private_and_stops_with_its_node_or_when_idle(owner, base):
    node = WarmNode(owner, idle_seconds=600, base=base)
    first, wanted = node.ensure({})
    wait_until(node.socket_path.exists, 60, "the worker's socket")
    assert stat.S_IMODE(node.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(node.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.record_path.stat().st_mode) == 0o600
    assert first.environ()["FLOWERTUNE_WARM_WORKER"] == "1"
    assert node.ensure({})[0].pid == first.pid  # same app, same model: reused
    assert WarmNode(owner, base=base).ensure({"model.name": "other"})[0].pid != first.pid
    assert not first.is_running() or first.status() == psutil.STATUS_ZOMBIE  # replaced
    assert len(workers_of(owner)) == 1

    second = node.worker()[0]
    wait_until(node.socket_path.exists, 60, "the new worker's socket")
    owner.kill()  # the SuperNode dies: its worker follows within a second or so
    wait_until(lambda: not second.is_running() or second.status() == psutil.STATUS_ZOMBIE, 10,
               "the worker to exit with its SuperNode")
    assert not node.folder.exists()  # socket, record and lock gone with the node


def test_idle_worker_exits(owner, base):
    node = WarmNode(owner, idle_seconds=1.5, base=base)
    worker, _ = node.ensure({})
    wait_until(node.socket_path.exists, 60, "the worker's socket")
    wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 20,
               "the idle worker to exit")
    assert not node.socket_path.exists()
    assert node.worker() is None


def test_worker_started_from_another_app_version_refuses_to_run(owner, base):
    node = WarmNode(owner, base=base)
    folder = private_folder(node.folder)
    result = subprocess.run(
        [sys.executable, "-m", "flowertune_nlp.warm_worker", "--folder", str(folder),
         "--owner", str(owner.pid), "--owner-created", repr(owner.create_time()),
         "--identity", "0" * 32, "--idle-seconds", "5"],
        input="{}", capture_output=True, text=True, timeout=60, cwd=package_root(),
        env={**os.environ, "FLOWERTUNE_WARM_WORKER": "1"})
    assert result.returncode == 3, result.stderr
    assert "another app version" in result.stderr
    assert not node.socket_path.exists()


def test_a_message_the_worker_never_took_goes_to_a_new_worker(owner, base, monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    node = WarmNode(owner, base=base)
    first, _ = node.ensure({})
    wait_until(node.socket_path.exists, 60, "the worker's socket")
    node.socket_path.unlink()  # it can take no message, and ends before it could
    threading.Timer(1.0, first.kill).start()
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    query = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    # the new worker takes it, and answers as it answers a query (not a warm worker's job)
    with pytest.raises(WarmWorkerError, match="does not handle 'query' messages"):
        node.forward(query, context)
    assert node.worker()[0].pid != first.pid
    assert node.stop()


def train_message(server_round: int) -> Message:
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(),
        wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round, wire.LEARNING_RATE: 1e-4,
                                   PARTITION_ID_KEY: 0, NUM_PARTITIONS_KEY: 2}),
    })
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.mark.slow
def test_a_worker_dying_mid_message_fails_that_message_and_the_next_starts_a_new_one(
        owner, base, tiny_model_dir, alpaca_sample, monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    run_config = {"model.name": str(tiny_model_dir), "model.quantization": 0,
                  "static.dataset.name": str(alpaca_sample), "static.dataset.num-partitions": 2,
                  "faults.inject": "stall:0:1,raise:0:2"}
    context = Context(run_id=1, node_id=7, node_config={PARTITION_ID_KEY: 0,
                                                        NUM_PARTITIONS_KEY: 2},
                      state=RecordDict(), run_config=run_config)
    node = WarmNode(owner, base=base)
    first, _ = node.ensure(run_config)
    def kill_once_it_works_on_the_message() -> None:
        # listening socket + the accepted connection: the handler runs (and stalls)
        wait_until(lambda: len(first.net_connections("unix")) >= 2, 120, "the message")
        time.sleep(0.5)
        first.kill()

    killer = threading.Thread(target=kill_once_it_works_on_the_message)
    killer.start()
    started = time.monotonic()
    with pytest.raises(WarmWorkerError, match="ended during the train message"):
        node.forward(train_message(1), context)  # round 1 stalls a minute: killed meanwhile
    assert time.monotonic() - started < 55
    killer.join(timeout=30)
    # the next message starts a new worker, which runs the handler (the injected raise comes
    # back as the same exception type a cold ClientApp raises)
    with pytest.raises(InjectedFault, match="injected failure"):
        node.forward(train_message(2), context)
    second = node.worker()[0]
    assert second.pid != first.pid
    assert node.stop() and not second.is_running()
