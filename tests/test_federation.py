"""The secured local Deployment Engine federation: credentials, `up`/`down` leaving nothing
behind, and what the SuperLink refuses (unregistered key, no TLS, another CA).

Every test starts its own SuperLink and SuperNodes on free loopback ports and stops them; a
leftover is any process carrying the federation's marker, or any Flower process whose command
line names one of its ports or its folder (other Flower runs on this machine are not ours).
"""

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import flower_runs
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flower_runs import flower_processes

from flowertune_nlp.federation import (
    CredentialsExist,
    LocalFederation,
    format_node_config,
    make_credentials,
    marked_processes,
    parse_node_config,
    read_record,
    stop_federation,
)

# Deployment processes the simulation-oriented list in flower_runs lacks.
DEPLOYMENT_PROCESSES = ("flower-supernode", "flwr-clientapp", "flwr-serverapp")
CLI = [sys.executable, "-m", "flowertune_nlp.federation"]
REFUSAL_TIMEOUT = 60  # each refused node must exit within this (observed: 2-3 s)


def leftovers(directory: Path, monkeypatch) -> list[str]:
    """Processes of the federation in `directory` still running, found two independent ways."""
    monkeypatch.setattr(flower_runs, "FLOWER_PROCESSES",
                        flower_runs.FLOWER_PROCESSES + DEPLOYMENT_PROCESSES)
    record = read_record(directory)
    ports = [e["port"] for e in record.get("processes", []) if e.get("port")]
    names = [str(directory)] + [f"127.0.0.1:{port}" for port in ports]
    found = [c for c in flower_processes() if any(name in c for name in names)]
    for entry in record.get("processes", []):
        try:
            proc = psutil.Process(entry["pid"])
            if (proc.status() != psutil.STATUS_ZOMBIE
                    and abs(proc.create_time() - entry["create_time"]) < 0.05):
                found.append(f"recorded pid {entry['pid']} ({entry['name']})")
        except psutil.NoSuchProcess:
            pass
    return found + [" ".join(p.cmdline()) for p in marked_processes(directory)]


@pytest.fixture
def fed_dir(tmp_path):
    """A federation folder that is torn down whatever the test did."""
    directory = tmp_path / "fed"
    yield directory
    stop_federation(directory, grace=5)


# ---------------------------------------------------------------------------------------------
# credentials and node config (fast)


def test_credentials_sans_key_formats_permissions_and_refusal(tmp_path):
    hosts = ["127.0.0.1", "localhost", "superlink.example.org", "10.1.2.3", "::1"]
    creds = make_credentials(tmp_path / "c", hosts, nodes=2)

    ca = x509.load_pem_x509_certificate(creds.ca_certificate.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the proxy's certificate names the hosts given; the loopback SuperLink's, 127.0.0.1 and
    # localhost only
    for path, key, dns, ips in (
            (creds.proxy_certificate, creds.proxy_key, ["localhost", "superlink.example.org"],
             ["10.1.2.3", "127.0.0.1", "::1"]),
            (creds.server_certificate, creds.server_key, ["localhost"], ["127.0.0.1"])):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(sans.get_values_for_type(x509.DNSName)) == dns
        assert sorted(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) == ips
        cert.verify_directly_issued_by(ca)  # signed by the CA
        private = serialization.load_pem_private_key(key.read_bytes(), None)
        assert private.public_key().public_numbers() == cert.public_key().public_numbers()

    for number in (1, 2):
        private = serialization.load_ssh_private_key(creds.node_key(number).read_bytes(), None)
        public = serialization.load_ssh_public_key(creds.node_public_key(number).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        assert creds.node_public_key(number).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert private.public_key().public_numbers() == public.public_numbers()
        signature = private.sign(b"hello", ec.ECDSA(hashes.SHA384()))
        public.verify(signature, b"hello", ec.ECDSA(hashes.SHA384()))
    for secret in (creds.ca_key, creds.server_key, creds.proxy_key, creds.node_key(1),
                   creds.node_key(2)):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(creds.directory.stat().st_mode) == 0o700

    before = creds.ca_certificate.read_bytes()
    with pytest.raises(CredentialsExist, match="--force"):
        make_credentials(tmp_path / "c", hosts, nodes=2)
    assert creds.ca_certificate.read_bytes() == before
    result = subprocess.run([*CLI, "credentials", "--out", str(tmp_path / "c"), "--hosts",
                             "127.0.0.1", "--nodes", "1"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "already holds credentials" in result.stderr
    assert creds.ca_certificate.read_bytes() == before
    result = subprocess.run([*CLI, "credentials", "--out", str(tmp_path / "c"), "--hosts",
                             "127.0.0.1,localhost", "--nodes", "1", "--force"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "PKI" in result.stdout
    assert creds.ca_certificate.read_bytes() != before


def test_node_config_round_trip_and_refusals():
    config = {"name": "hospital-a", "data-path": "/data/a b/local.jsonl", "partition-id": 0,
              "num-partitions": 3, "weight": 0.5, "flag": True}
    text = format_node_config(config)
    assert text.startswith('name="hospital-a" data-path="/data/a b/local.jsonl"')
    assert parse_node_config(text) == config
    assert parse_node_config(format_node_config({"p": r"C:\d\x"})) == {"p": r"C:\d\x"}
    with pytest.raises(ValueError, match="not key=value"):
        parse_node_config('data-path="/a.jsonl" partition-id')
    with pytest.raises(ValueError, match="double quote"):
        format_node_config({"name": 'a"b'})
    with pytest.raises(ValueError, match="unique"):
        LocalFederation("/tmp/unused", nodes=[{"name": "x"}, {"name": "x"}])


# ---------------------------------------------------------------------------------------------
# real federations (slow)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_up_status_down_three_nodes_cli(fed_dir, tmp_path, monkeypatch):
    data = tmp_path / "site a.jsonl"
    data.write_text('{"instruction": "i", "input": "", "output": "o"}\n')
    up = subprocess.run([*CLI, "up", "--dir", str(fed_dir), "--nodes", "3",
                         "--node-config", f'data-path="{data}"',
                         "--node-config", "partition-id=1 num-partitions=3"],
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    assert "3 SuperNodes online" in up.stdout
    assert f"FLWR_HOME={fed_dir / 'flwr-home'}" in up.stdout
    assert "run . local-deployment --stream" in up.stdout

    record = read_record(fed_dir)
    assert record["state"] == "up"
    roles = [e["role"] for e in record["processes"]]
    assert roles == ["superlink", "supernode", "supernode", "supernode"]
    superlink, *nodes = record["processes"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
                 "--enable-supernode-auth", "--database",
                 "--disable-runtime-dependency-installation"):
        assert flag in superlink["command"]
    assert [n["node_config"] for n in nodes] == [
        {"name": "site-1", "data-path": str(data)},
        {"name": "site-2", "partition-id": 1, "num-partitions": 3},
        {"name": "site-3", "partition-id": 2, "num-partitions": 20}]  # the default
    ports = [superlink["port"], *(n["port"] for n in nodes)]
    assert len(set(ports)) == 4 and 8000 not in ports and 9094 not in ports
    for node in nodes:
        assert "--root-certificates" in node["command"]
        assert "--auth-supernode-private-key" in node["command"]
        assert Path(node["log"]).is_file()
    config = (fed_dir / "flwr-home" / "config.toml").read_text()
    assert f'address = "127.0.0.1:{superlink["port"]}"' in config
    # the SuperLink's database (live task tokens) and the records: 0600 in a 0700 folder
    assert stat.S_IMODE(fed_dir.stat().st_mode) == 0o700
    for secret in ("state.db", "state.db-wal", "federation.json", "registrations.json"):
        assert stat.S_IMODE((fed_dir / secret).stat().st_mode) == 0o600, secret
    assert f'root-certificates = "{fed_dir / "ca.crt"}"' in config

    # the SuperLink's own view: exactly the three registered nodes, all online
    listing = subprocess.run([str(Path(sys.executable).with_name("flwr")), "supernode", "list",
                              "local-deployment", "--format", "json"],
                             env={**os.environ, "FLWR_HOME": str(fed_dir / "flwr-home")},
                             capture_output=True, text=True, timeout=60)
    assert listing.stdout.count('"status": "online"') == 3, listing.stdout
    for node in nodes:
        assert str(node["node_id"]) in listing.stdout

    status = subprocess.run([*CLI, "status", "--dir", str(fed_dir)], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.count(" running ") == 4, status.stdout
    assert "flower-superexec" in status.stdout

    again = subprocess.run([*CLI, "up", "--dir", str(fed_dir), "--nodes", "1"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "still running" in again.stderr

    down = subprocess.run([*CLI, "down", "--dir", str(fed_dir)], capture_output=True,
                          text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert leftovers(fed_dir, monkeypatch) == []
    assert read_record(fed_dir)["state"] == "stopped"
    down = subprocess.run([*CLI, "down", "--dir", str(fed_dir)], capture_output=True,
                          text=True, timeout=120)
    assert down.returncode == 0, down.stderr  # idempotent


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_refused_nodes_never_join_and_the_superlink_stays_healthy(fed_dir, tmp_path,
                                                                  monkeypatch):
    other_ca = make_credentials(tmp_path / "other", nodes=0).ca_certificate
    with LocalFederation(fed_dir, nodes=1, timeout=180) as fed:
        member = fed.nodes[0]
        assert fed.online_node_ids() == {member.node_id}
        started = time.monotonic()
        unregistered = fed.add_node(register=False, wait=False)
        keyless = fed.add_node(auth=False, wait=False)
        insecure = fed.add_node(insecure=True, register=False, wait=False)
        wrong_ca = fed.add_node(root_certificates=other_ca, wait=False)  # registered key
        insecure_keyless = fed.add_node(insecure=True, auth=False, max_wait_time=10,
                                        wait=False)
        exits = {}
        for node in (unregistered, keyless, insecure, wrong_ca, insecure_keyless):
            exits[node.name] = node.wait(REFUSAL_TIMEOUT)
        elapsed = time.monotonic() - started
        assert all(code == 1 for code in exits.values()), exits
        assert elapsed < REFUSAL_TIMEOUT

        assert "Failed to activate SuperNode" in unregistered.log_text()
        assert "All SuperNodes must be registered" in keyless.log_text()
        for node in (unregistered, keyless, wrong_ca, insecure_keyless):
            assert "Exit Code: 305" in node.log_text()  # could not connect
        assert "Exit Code: 303" in insecure.log_text()
        assert "requires a secure TLS connection" in insecure.log_text()
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.log_text()
        # without TLS and without a key Flower retries until --max-wait-time, then gives up
        assert "Giving up reconnection" in insecure_keyless.log_text()
        superlink_log = (fed.logs / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in superlink_log

        # only the registered, well-configured node ever came online; the SuperLink is fine
        nodes = fed.list_nodes()
        assert [int(n["node-id"]) for n in nodes if n["status"] == "online"] == [
            member.node_id]
        assert wrong_ca.node_id is not None
        assert {int(n["node-id"]): n["status"] for n in nodes}[wrong_ca.node_id] == "registered"
        assert fed.superlink_healthy()
        assert member.returncode is None

        # a node killed like a crashed machine: it and its process tree are gone
        tree = psutil.Process(member.pid).children(recursive=True)
        assert fed.kill_node(0) == -9
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    assert leftovers(fed_dir, monkeypatch) == []


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_failed_up_stops_what_it_started_and_names_the_log(fed_dir, monkeypatch):
    make_credentials(fed_dir, nodes=2)
    (fed_dir / "node-2").write_text("not a key\n")  # site-2 cannot start; site-1 can
    result = subprocess.run([*CLI, "up", "--dir", str(fed_dir), "--nodes", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "SuperNode site-2 exited" in result.stderr
    assert str(fed_dir / "logs" / "site-2.log") in result.stderr
    assert "Unable to parse the private key file" in result.stderr
    assert read_record(fed_dir)["state"] == "stopped"
    assert len(read_record(fed_dir)["processes"]) == 3  # superlink, site-1, site-2
    assert leftovers(fed_dir, monkeypatch) == []


SLEEPY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sleepy"
version = "0.1.0"
description = "asks every node its name, after a nap"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "sleepy_app:server"
clientapp = "sleepy_app:client"

[tool.flwr.app.config]
sleep = 0.0
"""

SLEEPY_APP = '''\
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({"c": ConfigRecord({"sleep": float(context.run_config["sleep"])})})
    replies = grid.send_and_receive(
        [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes],
        timeout=600)
    names = sorted(str(r.content["c"]["name"]) for r in replies if r.has_content())
    print(f"SLEEPY nodes={len(nodes)} names={','.join(names)}", flush=True)


@client.query()
def query(msg: Message, context: Context) -> Message:
    time.sleep(float(msg.content["c"]["sleep"]))
    return Message(RecordDict({"c": ConfigRecord({"name": str(context.node_config["name"])})}),
                   reply_to=msg)
'''


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_app_runs_over_tls_and_down_stops_a_run_in_flight(fed_dir, tmp_path, monkeypatch):
    app = tmp_path / "sleepy"
    app.mkdir()
    (app / "pyproject.toml").write_text(SLEEPY_PYPROJECT)
    (app / "sleepy_app.py").write_text(SLEEPY_APP)
    fed = LocalFederation(fed_dir, nodes=[{"name": "hospital-a"}, {"name": "hospital-b"}],
                          timeout=180, grace=5)
    with fed:
        done = subprocess.run(fed.run_command(app), env=fed.env, cwd=app, capture_output=True,
                              text=True, timeout=240)
        assert "SLEEPY nodes=2 names=hospital-a,hospital-b" in done.stdout, (
            done.stdout[-2000:] + done.stderr[-2000:])

        runner = subprocess.Popen(fed.run_command(app, "sleep=300"), env=fed.env, cwd=app,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 180
            busy: list[str] = []
            while time.monotonic() < deadline and len(busy) < 3:
                busy = [" ".join(p.cmdline()) for p in marked_processes(fed_dir)
                        if any(n in " ".join(p.cmdline())
                               for n in ("flwr-clientapp", "flwr-serverapp"))]
                time.sleep(1)
            assert len(busy) == 3, busy  # one ServerApp, one ClientApp per node
            assert fed.down() == []
            assert runner.wait(timeout=60) is not None  # run with fed.env: stopped too
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
    assert leftovers(fed_dir, monkeypatch) == []


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_node_restarts_with_its_node_id(fed_dir, monkeypatch):
    with LocalFederation(fed_dir, nodes=2, timeout=180, grace=5) as fed:
        node_id = fed.nodes[1].node_id
        fed.kill_node(1)
        # the SuperLink still counts it online until its heartbeat expires (60 s) ...
        restarted = fed.restart_node(1)
        assert restarted.node_id == node_id
        assert fed.online_node_ids() == {n.node_id for n in fed.nodes}
        assert restarted.pid in fed.node_pids
    assert leftovers(fed_dir, monkeypatch) == []
