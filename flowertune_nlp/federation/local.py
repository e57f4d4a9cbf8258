"""A secured Flower 1.42 Deployment Engine federation on loopback, for trying it and for tests.

One SuperLink (TLS, `--enable-supernode-auth`, state in `DIR/state.db`) and N SuperNodes, each
with its own registered key, Runtime API port, FLWR_HOME and `--node-config`. With `proxy`, the
multi-machine layout: the nodes dial an nginx Fleet proxy (TLS, Fleet API only, proxy.py) on its
own port instead of the SuperLink, which only `flwr` and the SuperLink's own processes reach.
All ports are picked free at start (bind port 0), so two federations, or a federation and a
simulation, never collide. processes.py records what is started and stops it by PID. DIR is
0700 and its secrets (keys, state.db, the records) 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w

from flowertune_nlp.federation.credentials import (
    CA_CERT,
    DEFAULT_HOSTS,
    LOOPBACK_NAMES,
    Credentials,
    ensure_node_keys,
    make_credentials,
    make_node_key,
    make_proxy_certificate,
    secret_folder,
    subject_alternative_names_of,
)
from flowertune_nlp.federation.node_config import format_node_config, parse_node_config
from flowertune_nlp.federation.processes import (
    LOOPBACK,
    MARKER,
    RECORD,
    FederationError,
    free_port,
    log_tail,
    now,
    read_record,
    recorded_process,
    stop_federation,
    strip_ansi,
)
from flowertune_nlp.federation.proxy import find_nginx, render_loopback_main, render_site
from flowertune_nlp.flower_home import flower_environment
from flowertune_nlp.io import PRIVATE_FILE_MODE, atomic_write_json, atomic_write_text, private_dir

DEFAULT_NAME = "local-deployment"
REGISTRATIONS = "registrations.json"
DATABASE = "state.db"  # holds live task tokens: 0600, as SQLite's -wal/-shm files that copy it
BIN = Path(sys.executable).parent


def _epoch(timestamp: str | None) -> float:
    """Seconds since the epoch of a `flwr supernode list` time ('2026-01-02 03:04:05Z')."""
    try:
        return datetime.strptime(str(timestamp), "%Y-%m-%d %H:%M:%SZ").replace(
            tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------
# the federation


@dataclass
class Node:
    """One SuperNode this federation started (`number` names its key: `node-<number>`)."""

    number: int
    name: str
    config: dict[str, Any]
    port: int
    log: Path
    key: Path | None
    registered: bool
    process: subprocess.Popen
    node_id: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit code once the node has exited, or None if it still runs after `timeout`."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        return strip_ansi(self.log.read_text(errors="replace")) if self.log.exists() else ""


class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

        with LocalFederation(tmp, nodes=[{"data-path": "/abs/a.jsonl"},
                                         {"partition-id": 0, "num-partitions": 2}]) as fed:
            subprocess.run(fed.run_command(".", "configs/cpu-smoke.toml"), env=fed.env)

    `nodes` is a count or one node config per node (a mapping or a `--node-config` string);
    node i (1-based) is named `site-i` unless its config names it. Credentials are made in
    `directory` when it has none. With `proxy`, the nodes reach the SuperLink only through the
    Fleet proxy (nginx must be installed).
    """

    def __init__(self, directory: Path | str, nodes: int | Sequence[Mapping[str, Any] | str] = 3,
                 name: str = DEFAULT_NAME, *, jemalloc: bool = True, timeout: float = 120.0,
                 grace: float = 10.0, echo: Callable[[str], None] | None = None,
                 threads_per_node: int | None = None, proxy: bool = False) -> None:
        self.directory = Path(directory).resolve()
        specs = [{} for _ in range(nodes)] if isinstance(nodes, int) else list(nodes)
        self.node_specs = [parse_node_config(s) if isinstance(s, str) else dict(s)
                           for s in specs]
        names = [str(s.get("name", f"site-{i}")) for i, s in enumerate(self.node_specs, 1)]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"federation name {name!r}: use letters, digits, '-' or '_'")
        self.federation_name = name
        self.jemalloc = jemalloc
        # Nodes sharing one machine each use every core by default: n nodes training at once
        # then run n times more threads than cores. The CPU threads each node's ClientApps use.
        self.threads_per_node = threads_per_node
        self.timeout = timeout
        self.grace = grace
        self.echo = echo or (lambda _msg: None)
        self.credentials = Credentials(self.directory)
        self.flwr_home = self.directory / "flwr-home"
        self.logs = self.directory / "logs"
        self.superlink_port: int | None = None
        self.superlink: subprocess.Popen | None = None
        self.proxy = proxy
        self.proxy_port: int | None = None
        self.proxy_process: subprocess.Popen | None = None
        self.nodes: list[Node] = []
        self._ports: set[int] = set()
        self._entries: list[dict[str, Any]] = []
        self._state = "new"

    # -- properties --------------------------------------------------------------------------

    @property
    def superlink_address(self) -> str:
        """Where `flwr` and the SuperLink's own processes reach it (never the nodes, with a
        proxy)."""
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def proxy_address(self) -> str | None:
        return f"{LOOPBACK}:{self.proxy_port}" if self.proxy_port else None

    @property
    def fleet_address(self) -> str:
        """What the SuperNodes dial: the Fleet proxy if there is one, else the SuperLink."""
        return self.proxy_address or self.superlink_address

    @property
    def node_pids(self) -> list[int]:
        return [node.pid for node in self.nodes]

    @property
    def env(self) -> dict[str, str]:
        """The environment for `flwr` commands against this federation (FLWR_HOME, PATH).

        It carries the federation's marker: whatever runs with it is stopped by `down` too."""
        return self._env(self.flwr_home)

    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = flower_environment(flwr_home, self.jemalloc)
        env[MARKER] = str(self.directory)
        return env

    def run_command(self, app: str | Path = ".", *run_configs: str) -> list[str]:
        """`flwr run <app> <federation> --stream [--run-config ...]` for this federation."""
        command = [str(BIN / "flwr"), "run", str(app), self.federation_name, "--stream"]
        for run_config in run_configs:
            command += ["--run-config", run_config]
        return command

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        return self.up()

    def __exit__(self, exc_type, exc, tb) -> None:
        left = self.down()
        if left and exc_type is None:
            raise FederationError("processes left after down: " + "; ".join(left))

    def up(self) -> LocalFederation:
        """Start the SuperLink and the nodes; return once every node is online. On any
        failure, stop what was started and raise FederationError."""
        if self.superlink is not None:
            raise FederationError("this federation is already up")
        running = [p for e in read_record(self.directory).get("processes", [])
                   if (p := recorded_process(e))]
        if running:
            raise FederationError(f"a federation from {self.directory} is still running "
                                  f"({len(running)} processes); run `python -m "
                                  f"flowertune_nlp.federation down --dir {self.directory}`")
        secret_folder(self.directory, (RECORD, CA_CERT, DATABASE))
        self.logs.mkdir(exist_ok=True)
        self._entries, self.nodes, self._state = [], [], "starting"
        try:
            self._prepare_credentials()
            self._start_superlink()
            if self.proxy:
                self._start_proxy()
            self._write_flower_config()
            for number, spec in enumerate(self.node_specs, start=1):
                self.add_node(spec, number=number, wait=False)
            self._wait_online(self.nodes)
            self._state = "up"
            self._record()
        except BaseException:
            self._state = "failed"
            with contextlib.suppress(Exception):
                self._record()
            self.down()
            raise
        return self

    def down(self) -> list[str]:
        """Stop everything (by PID, with process trees); return what could not be stopped."""
        left = stop_federation(self.directory, self.grace)
        for process in [self.superlink, self.proxy_process, *(n.process for n in self.nodes)]:
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)  # reap
        self.superlink = self.proxy_process = None
        self._state = "stopped"
        return left

    # -- parts -------------------------------------------------------------------------------

    def _prepare_credentials(self) -> None:
        creds = self.credentials
        if not creds.tls_complete():
            self.echo(f"making prototype credentials in {self.directory}")
            make_credentials(self.directory, DEFAULT_HOSTS, nodes=0)
        if self.proxy and not creds.proxy_complete():
            make_proxy_certificate(creds, DEFAULT_HOSTS)
        # What dials what here: the SuperExec and `flwr` dial the SuperLink at 127.0.0.1, the
        # proxy checks its name localhost, and the nodes dial 127.0.0.1 (proxy or SuperLink).
        needed = {creds.server_certificate: set(LOOPBACK_NAMES if self.proxy else [LOOPBACK])}
        if self.proxy:
            needed[creds.proxy_certificate] = {LOOPBACK}
        for certificate, names in needed.items():
            if missing := names - subject_alternative_names_of(certificate):
                raise FederationError(f"{certificate} does not name {', '.join(sorted(missing))}"
                                      "; make new credentials (python -m "
                                      "flowertune_nlp.federation credentials --force)")
        ensure_node_keys(self.directory, len(self.node_specs))

    def _start(self, role: str, name: str, command: list[str], env: dict[str, str],
               log: Path, **extra: Any) -> subprocess.Popen:
        """Start one process in its own session, logging to `log`, and record it."""
        with open(log, "ab") as handle:
            handle.write(f"\n=== {now()} {shlex.join(command)}\n".encode())
            handle.flush()
            process = subprocess.Popen(command, env=env, cwd=self.directory,
                                       stdin=subprocess.DEVNULL, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        try:
            create_time = psutil.Process(process.pid).create_time()
        except psutil.Error:
            create_time = 0.0  # already gone: nothing to stop later
        self._entries.append(dict(role=role, name=name, pid=process.pid,
                                  create_time=create_time, started_at=now(),
                                  command=command, log=str(log), **extra))
        self._record()
        return process

    def _record(self) -> None:
        atomic_write_json(self.directory / RECORD, {
            "federation": self.federation_name, "directory": str(self.directory),
            "state": self._state, "address": (self.superlink_address if self.superlink_port
                                              else None),
            "fleet_address": self.fleet_address if self.superlink_port else None,
            "flwr_home": str(self.flwr_home),
            "ca_certificate": str(self.credentials.ca_certificate),
            "processes": self._entries, "updated_at": now(),
        }, private=True)

    def _answers(self, address: str, status: int) -> bool:
        """Whether `address` answers GET /health over TLS, with a certificate our CA signed and
        that names 127.0.0.1, with HTTP `status`."""
        context = ssl.create_default_context(cafile=str(self.credentials.ca_certificate))
        try:
            return httpx.get(f"https://{address}/health", verify=context,
                             timeout=1.0).status_code == status
        except httpx.HTTPError:
            return False

    def _superlink_healthy(self) -> bool:
        return self._answers(self.superlink_address, 200)

    def superlink_healthy(self) -> bool:
        """Whether the SuperLink runs and answers its health check over TLS."""
        return (self.superlink is not None and self.superlink.poll() is None
                and self._superlink_healthy())

    def _start_listener(self, role: str, command_for: Callable[[int], list[str]],
                        ready: Callable[[str], bool], log: Path, what: str
                        ) -> tuple[subprocess.Popen, int]:
        """Start a server on a free loopback port and wait until `ready(address)`; a port
        taken between the probe and the bind is tried again, any other exit is an error."""
        limit = min(self.timeout, 90.0)
        for _attempt in range(3):
            port = free_port(self._ports)
            address = f"{LOOPBACK}:{port}"
            self.echo(f"starting {what} on {address} (log: {log})")
            process = self._start(role, role, command_for(port), self._env(self.flwr_home),
                                  log, port=port)
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                if ready(address):
                    return process, port
                time.sleep(0.3)
            else:
                raise FederationError(f"{what} did not answer on https://{address} within "
                                      f"{limit:.0f} s; see {log}\n" + log_tail(log))
            if "address already in use" not in log_tail(log, 40).lower():
                raise FederationError(f"{what} exited with code {process.returncode} during "
                                      f"start-up; see {log}\n" + log_tail(log))
        raise FederationError(f"{what} found its port taken three times; see {log}")

    def _start_superlink(self) -> None:
        creds = self.credentials
        database = self.directory / DATABASE
        # Flower creates the database with the umask's mode, and SQLite gives its -wal and -shm
        # files the database's mode: an empty 0600 file (a valid empty SQLite database) first.
        for path in [database, *(database.with_name(DATABASE + s) for s in ("-wal", "-shm",
                                                                           "-journal"))]:
            if path.exists():
                path.chmod(PRIVATE_FILE_MODE)
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))

        def command(port: int) -> list[str]:
            return [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(creds.ca_certificate),
                "--ssl-certfile", str(creds.server_certificate),
                "--ssl-keyfile", str(creds.server_key),
                "--enable-supernode-auth",
                "--database", str(database),
                "--disable-runtime-dependency-installation",
                "--host", LOOPBACK, "--port", str(port),
            ]

        self.superlink, self.superlink_port = self._start_listener(
            "superlink", command, lambda address: self._answers(address, 200),
            self.logs / "superlink.log", "SuperLink")

    def _start_proxy(self) -> None:
        """nginx on its own port: TLS with proxy.pem, the Fleet API forwarded to the SuperLink
        (checked against our CA as `localhost`), everything else refused with 403."""
        nginx, creds = find_nginx(), self.credentials
        folder = private_dir(self.directory / "proxy")
        site, main = folder / "fleet-proxy.conf", folder / "nginx.conf"
        log = self.logs / "proxy.log"
        atomic_write_text(main, render_loopback_main(folder, site, log,
                                                     self.logs / "proxy-access.log"))

        def command(port: int) -> list[str]:
            atomic_write_text(site, render_site(
                f"{LOOPBACK}:{port}", self.superlink_address, creds.proxy_certificate,
                creds.proxy_key, creds.ca_certificate, superlink_name="localhost"))
            return [nginx, "-e", str(log), "-p", str(folder), "-c", str(main)]

        # Ready: /health answered, over TLS with proxy.pem, with the proxy's own refusal.
        self.proxy_process, self.proxy_port = self._start_listener(
            "proxy", command, lambda address: self._answers(address, 403), log,
            "Fleet proxy (nginx)")

    def _write_flower_config(self) -> None:
        """The Flower configuration `flwr` reads from FLWR_HOME: this federation, by name."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.flwr_home / "config.toml", tomli_w.dumps({"superlink": {
            "default": self.federation_name,
            self.federation_name: {
                "address": self.superlink_address,
                "root-certificates": str(self.credentials.ca_certificate),
            },
        }}))

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this federation."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.directory,
                              capture_output=True, text=True, timeout=timeout)

    def _flwr_json(self, *args: str) -> dict[str, Any]:
        result = self.flwr(*args, "--format", "json")
        text = result.stdout
        try:
            reply = json.loads(text[text.index("{"):])
        except ValueError:
            reply = {"success": False, "error-message": (text + result.stderr).strip()}
        return reply

    def list_nodes(self) -> list[dict[str, Any]]:
        """`flwr supernode list -v`: every node the SuperLink knows, with its status
        ("registered", "online", "offline", "unregistered")."""
        reply = self._flwr_json("supernode", "list", self.federation_name, "-v")
        if not reply.get("success"):
            raise FederationError(f"`flwr supernode list` failed: {reply.get('error-message')}")
        return reply["nodes"]

    def online_node_ids(self, since: float | None = None) -> set[int]:
        """Ids of the online nodes; with `since` (a time.time()), only those activated then or
        later (the SuperLink's database keeps a vanished node "online" for up to 60 s)."""
        return {int(n["node-id"]) for n in self.list_nodes() if n["status"] == "online"
                and (since is None or _epoch(n.get("online-at")) >= int(since) - 1)}

    def register(self, public_key: Path, name: str) -> int | None:
        """Register a node's public key; its node id (None if the key was registered before
        and is not in DIR/registrations.json)."""
        fingerprint = hashlib.sha256(public_key.read_bytes().split()[1]).hexdigest()
        known_path = self.directory / REGISTRATIONS
        known = json.loads(known_path.read_text()) if known_path.exists() else {}
        reply = self._flwr_json("supernode", "register", str(public_key),
                                self.federation_name, "--name", name)
        if reply.get("success"):
            known[fingerprint] = {"node_id": int(reply["node-id"]), "name": name}
            atomic_write_json(known_path, known, private=True)
            return int(reply["node-id"])
        message = str(reply.get("error-message", ""))
        if "already in use" in message:  # registered in state.db by an earlier `up`
            return known.get(fingerprint, {}).get("node_id")
        raise FederationError(f"registering {public_key} as {name} failed: {message}; "
                              f"see {self.logs / 'superlink.log'}")

    def add_node(self, config: Mapping[str, Any] | str | None = None, *,
                 number: int | None = None, register: bool = True, auth: bool = True,
                 insecure: bool = False, root_certificates: Path | None = None,
                 max_wait_time: float | None = None, wait: bool = True,
                 timeout: float | None = None) -> Node:
        """Start one more SuperNode (also used by `up`).

        The knobs beyond `config` exist to show what the SuperLink refuses: `register=False`
        (a key it does not know), `auth=False` (no key), `insecure=True` (no TLS),
        `root_certificates` (trust another CA). `max_wait_time` bounds the node's reconnect
        attempts (`--max-wait-time`). With `wait`, return once the node is online.
        """
        if self.superlink is None or self.superlink_port is None:
            raise FederationError("start the federation (up) before adding nodes")
        config = parse_node_config(config) if isinstance(config, str) else dict(config or {})
        if number is None:
            number = max((n.number for n in self.nodes), default=len(self.node_specs)) + 1
        name = str(config.setdefault("name", f"site-{number}"))
        config = {"name": name, **{k: v for k, v in config.items() if k != "name"}}
        key = self.credentials.node_key(number) if auth else None
        if key is not None and not key.is_file():
            make_node_key(key, self.credentials.node_public_key(number), force=True)
        node_id = None
        if register and key is not None:
            node_id = self.register(self.credentials.node_public_key(number), name)
        port = free_port(self._ports)
        home = self.directory / "nodes" / name
        home.mkdir(parents=True, exist_ok=True)
        command = [str(BIN / "flower-supernode"), "--superlink", self.fleet_address]
        if insecure:
            command.append("--insecure")
        else:
            command += ["--root-certificates",
                        str(root_certificates or self.credentials.ca_certificate)]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        if max_wait_time is not None:
            command += ["--max-wait-time", str(max_wait_time)]
        command += ["--port", str(port), "--node-config", format_node_config(config)]
        # SuperNodes install no app dependencies unless --allow-runtime-dependency-installation
        log = self.logs / f"{name}.log"
        self.echo(f"starting SuperNode {name} (Runtime API port {port}, log: {log})")
        env = self._env(home)
        if self.threads_per_node:
            env["OMP_NUM_THREADS"] = str(self.threads_per_node)
        process = self._start("supernode", name, command, env, log, port=port,
                              node_id=node_id, node_config=config, number=number)
        node = Node(number=number, name=name, config=config, port=port, log=log, key=key,
                    registered=register and key is not None, process=process, node_id=node_id,
                    options=dict(insecure=insecure, root_certificates=root_certificates,
                                 max_wait_time=max_wait_time, auth=auth, register=register))
        self.nodes.append(node)
        if wait:
            self._wait_online([node], timeout)
        return node

    def _wait_online(self, nodes: Sequence[Node], timeout: float | None = None) -> None:
        """Poll `flwr supernode list` until every node in `nodes` is online; fail early,
        naming the node and its log, if one exits."""
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        while True:
            for node in nodes:
                if node.process.poll() is not None:
                    raise FederationError(
                        f"SuperNode {node.name} exited with code {node.process.returncode} "
                        f"before it came online; see {node.log}\n{log_tail(node.log)}")
            if self.superlink is not None and self.superlink.poll() is not None:
                log = self.logs / "superlink.log"
                raise FederationError(f"SuperLink exited with code {self.superlink.returncode};"
                                      f" see {log}\n{log_tail(log)}")
            online = self.online_node_ids(since=min(n.started for n in nodes))
            missing = [n for n in nodes if n.node_id is not None and n.node_id not in online]
            # keys registered by an earlier `up` whose id was not recorded: count them
            unknown = [n for n in nodes if n.node_id is None]
            spare = online - {n.node_id for n in self.nodes}
            if not missing and len(spare) >= len(unknown):
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{n.name} (log: {n.log})" for n in missing + unknown)
                raise FederationError(f"SuperNodes not online after {limit:.0f} s: {names}")
            time.sleep(1.0)

    def kill_node(self, index: int) -> int:
        """SIGKILL node `index` (0-based, in `nodes`) and its process tree, as if its machine
        died; return the node's exit code (-9)."""
        node = self.nodes[index]
        try:
            family = psutil.Process(node.pid).children(recursive=True)
        except psutil.Error:
            family = []
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(signal.SIGKILL)
        for proc in family:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(family, timeout=10)
        return node.process.wait(timeout=10)

    def restart_node(self, index: int, wait: bool = True) -> Node:
        """Start node `index` again with the same key, name and config (same node id).

        A node that vanished without saying goodbye (SIGKILL) stays "online" at the SuperLink
        until its heartbeat expires (up to 60 s), and is refused until then: wait for that.
        """
        old = self.nodes[index]
        if old.process.poll() is None:
            raise FederationError(f"SuperNode {old.name} is still running")
        if old.node_id is not None:  # refused while the SuperLink still counts it online
            deadline = time.monotonic() + 75
            while (old.node_id in self.online_node_ids()
                   and time.monotonic() < deadline):
                time.sleep(2.0)
        opts = old.options
        self.nodes.pop(index)
        node = self.add_node(old.config, number=old.number, register=False, wait=False,
                             auth=opts["auth"], insecure=opts["insecure"],
                             root_certificates=opts["root_certificates"],
                             max_wait_time=opts["max_wait_time"])
        node.node_id, node.registered = old.node_id, old.registered
        self.nodes.remove(node)
        self.nodes.insert(index, node)
        if wait:
            self._wait_online([node])
        return node
