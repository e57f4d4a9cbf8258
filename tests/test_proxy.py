"""The multi-machine layout: a loopback-only SuperLink behind an nginx proxy that terminates TLS
and forwards only the Fleet API (flowertune_nlp.federation.proxy, `up --proxy`).

Shows that the recipe's `credentials` command, exactly as the docs write it, names what dials
each certificate; that nodes train through the proxy; that the Control and Runtime APIs
(`flwr ls/run`, `flwr supernode register`, raw requests, path tricks) are refused at the proxy
and still work on loopback; and that the federation's secrets are 0600 in a 0700 folder.
"""

import json
import os
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import tomli_w
from flower_runs import tiny_settings

from flowertune_nlp.federation import (
    LocalFederation,
    make_credentials,
    read_record,
    stop_federation,
    subject_alternative_names_of,
)
from flowertune_nlp.federation.proxy import render_loopback_main
from flowertune_nlp.launch import APP_DIR

CLI = [sys.executable, "-m", "flowertune_nlp.federation"]
DEPLOYMENT_DOC = APP_DIR / "docs" / "deployment.md"
DOCUMENTED_CREDENTIALS = ("python -m flowertune_nlp.federation credentials --out creds "
                          "--hosts superlink.example.org,10.0.0.5 --nodes 0")
FLWR = str(Path(sys.executable).with_name("flwr"))
nginx_missing = pytest.mark.skipif(
    shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    is None, reason="nginx is not installed (apt-get install nginx; .ci/run installs it)")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tls_handshake(certificate: Path, key: Path, ca: Path, name: str) -> bool:
    """Whether a client trusting `ca` accepts a server presenting `certificate` when it dials
    the server as `name` (real handshake over loopback; the name is what the client checks)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certificate, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            with server_context.wrap_socket(connection, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(ca))
    try:
        with (socket.create_connection(listener.getsockname(), timeout=10) as raw,
              client_context.wrap_socket(raw, server_hostname=name)):
            return True
    except ssl.SSLCertVerificationError:
        return False
    finally:
        thread.join(timeout=10)
        listener.close()


def test_the_documented_credentials_command_names_what_dials_each_certificate(tmp_path):
    assert DOCUMENTED_CREDENTIALS in DEPLOYMENT_DOC.read_text()  # tested exactly as written
    command = shlex.split(DOCUMENTED_CREDENTIALS)
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    creds = tmp_path / "creds"
    ca = creds / "ca.crt"
    # the proxy: the public names the SuperNodes dial; the SuperLink: only what dials it on
    # its loopback address (its SuperExec, ServerApps, `flwr` there or via a tunnel, the proxy)
    assert subject_alternative_names_of(creds / "proxy.pem") == {"superlink.example.org",
                                                                 "10.0.0.5"}
    assert subject_alternative_names_of(creds / "server.pem") == {"127.0.0.1", "localhost"}
    proxy = (creds / "proxy.pem", creds / "proxy.key", ca)
    superlink = (creds / "server.pem", creds / "server.key", ca)
    assert tls_handshake(*proxy, "superlink.example.org")
    assert tls_handshake(*proxy, "10.0.0.5")
    assert not tls_handshake(*proxy, "other.example.org")
    assert not tls_handshake(*proxy, "127.0.0.1")
    assert tls_handshake(*superlink, "127.0.0.1")  # SuperExec, flwr on the machine
    assert tls_handshake(*superlink, "localhost")  # the proxy's check (proxy_ssl_name)
    assert not tls_handshake(*superlink, "superlink.example.org")  # nodes never dial it

    assert mode(creds) == 0o700
    for secret in ("ca.key", "server.key", "proxy.key"):
        assert mode(creds / secret) == 0o600, secret
    for public in ("ca.crt", "server.pem", "proxy.pem"):
        assert mode(creds / public) & 0o044, public  # certificates stay readable
    assert not list(creds.glob("node-*"))  # each data holder makes its own key pair


def test_a_shared_folder_is_refused_not_chmodded(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("someone else's file\n")
    for args in (["credentials", "--out", str(shared)], ["up", "--dir", str(shared)]):
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert "a folder of their own" in result.stderr
        assert mode(shared) == 0o755
        assert sorted(p.name for p in shared.iterdir()) == ["notes.txt"]


@nginx_missing
def test_the_proxy_config_cli_renders_a_site_nginx_accepts(tmp_path):
    creds = make_credentials(tmp_path / "creds", ["superlink.example.org"], nodes=0)
    site = tmp_path / "flower-fleet.conf"
    result = subprocess.run([*CLI, "proxy-config", "--listen", "127.0.0.1:8443",
                             "--superlink", "127.0.0.1:8001",
                             "--certificate", str(creds.proxy_certificate),
                             "--key", str(creds.proxy_key), "--ca", str(creds.ca_certificate),
                             "--out", str(site)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = site.read_text()
    assert "location ~ ^/v1/fleet/[a-z0-9-]+$" in text and "server 127.0.0.1:8001;" in text
    assert "${" not in text
    main = tmp_path / "nginx.conf"
    main.write_text(render_loopback_main(tmp_path, site, tmp_path / "e.log", tmp_path / "a.log"))
    nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    check = subprocess.run([nginx, "-t", "-e", str(tmp_path / "e.log"), "-p", str(tmp_path),
                            "-c", str(main)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    bad = subprocess.run([*CLI, "proxy-config", "--certificate", "/a b/p.pem", "--key", "k",
                          "--ca", "c"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "may not contain" in bad.stderr


# ---------------------------------------------------------------------------------------------
# a real proxied federation (slow)


def raw_status(address: str, ca: Path, target: str, method: str = "POST") -> int:
    """The HTTP status for a request line sent byte for byte (no client-side normalisation of
    dot segments or escapes), over TLS checked against `ca`."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    with (socket.create_connection((host, int(port)), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname=host) as tls):
        tls.sendall(f"{method} {target} HTTP/1.1\r\nHost: {address}\r\n"
                    "Content-Type: application/protobuf\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode())
        return int(tls.recv(64).split()[1])


def control_requests(fed: LocalFederation) -> int:
    """Control API requests the SuperLink has served so far (its uvicorn access log)."""
    return (fed.logs / "superlink.log").read_text().count("POST /v1/control/")


@pytest.fixture
def fed_dir(tmp_path):
    directory = tmp_path / "fed"
    yield directory
    stop_federation(directory, grace=5)


@nginx_missing
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_train_through_the_fleet_proxy_and_nothing_else_passes_it(
        fed_dir, tmp_path, tiny_model_dir, alpaca_sample):
    nodes = [{"partition-id": p, "num-partitions": 2} for p in range(2)]
    with LocalFederation(fed_dir, nodes, timeout=180, grace=5, threads_per_node=1,
                         proxy=True) as fed:
        ca = fed.credentials.ca_certificate
        proxy, superlink = fed.proxy_address, fed.superlink_address
        # the layout: the SuperLink listens on loopback only; the nodes dial the proxy
        listening = {c.laddr for c in psutil.Process(fed.superlink.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", fed.superlink_port)}
        for node in fed.nodes:
            command = node.process.args
            assert command[command.index("--superlink") + 1] == proxy
        nginx_family = [fed.proxy_process.pid, *(p.pid for p in psutil.Process(
            fed.proxy_process.pid).children(recursive=True))]

        # secrets: 0600 in a 0700 folder, the SuperLink's database and its WAL included
        assert mode(fed_dir) == 0o700
        assert (fed_dir / "state.db-wal").exists()
        for secret in ("ca.key", "server.key", "proxy.key", "node-1", "node-2", "state.db",
                       "state.db-wal", "state.db-shm", "federation.json",
                       "registrations.json"):
            assert mode(fed_dir / secret) == 0o600, secret

        # `flwr` pointed at the proxy's port: refused, and the SuperLink never sees the call
        home = tmp_path / "via-proxy"
        home.mkdir()
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": "via-proxy",
            "via-proxy": {"address": proxy, "root-certificates": str(ca)}}}))
        run_config = tmp_path / "run.toml"
        run_config.write_text(tomli_w.dumps(tiny_settings(
            tiny_model_dir, alpaca_sample, tmp_path, "proxied",
            **{"static.dataset.num-partitions": 2, "strategy.fraction-train": 1.0,
               "federation.min-nodes": 2, "federation.wait-seconds": 60.0})))
        stranger = tmp_path / "stranger"
        make_credentials(stranger, nodes=1)
        env = {**fed.env, "FLWR_HOME": str(home)}
        known_nodes = {n["node-id"]: n["status"] for n in fed.list_nodes()}
        served = control_requests(fed)
        for args in (["ls", "via-proxy"],
                     ["run", str(APP_DIR), "via-proxy", "--run-config", str(run_config)],
                     ["supernode", "register", str(stranger / "node-1.pub"), "via-proxy",
                      "--name", "stranger"]):
            refused = subprocess.run([FLWR, *args], env=env, capture_output=True, text=True,
                                     timeout=120)
            assert refused.returncode != 0, args
            assert "403" in refused.stdout + refused.stderr, args

        # raw requests and path tricks: refused at the proxy
        context = ssl.create_default_context(cafile=str(ca))
        for path in ("/v1/control/list-runs", "/v1/runtime/acquire-task"):
            through = httpx.post(f"https://{proxy}{path}", verify=context,
                                 headers={"content-type": "application/protobuf"})
            assert through.status_code == 403, path
        for target in ("/health", "/docs", "/openapi.json", "/v1/fleet/../control/list-runs",
                       "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/..%2fcontrol/list-runs",
                       "//v1/control/list-runs", "/v1/fleet/get-run?x=/v1/control",
                       "/v1/fleet/get-run/../../control/list-runs"):
            assert raw_status(proxy, ca, target) == 403, target
        assert raw_status(proxy, ca, "/v1/fleet/pull-messages", method="GET") == 403
        # a Fleet call does pass, to be refused by the SuperLink's own node authentication
        assert raw_status(proxy, ca, "/v1/fleet/get-run") == 401
        # the same raw requests on loopback are served (so the proxy is what refused them);
        # the SuperLink logs requests in order: once this one is logged, none of the refused
        # Control calls above reached it
        for path in ("/v1/runtime/acquire-task", "/v1/control/list-runs"):
            direct = httpx.post(f"https://{superlink}{path}", verify=context,
                                headers={"content-type": "application/protobuf"})
            assert direct.status_code == 200, path
        deadline = time.monotonic() + 30
        while control_requests(fed) == served and time.monotonic() < deadline:
            time.sleep(0.2)
        assert control_requests(fed) == served + 1

        # the same `flwr ls` on the loopback address works; no run started, no key registered
        listed = fed.flwr("ls", fed.federation_name, "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert json.loads(listed.stdout[listed.stdout.index("{"):])["runs"] == []
        assert {n["node-id"]: n["status"] for n in fed.list_nodes()} == known_nodes

        # a two-round run whose every node message goes through the proxy
        done = subprocess.run(fed.run_command(APP_DIR, str(run_config)), env=fed.env,
                              capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        access = (fed.logs / "proxy-access.log").read_text()
        assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in access
    record = json.loads((tmp_path / "proxied" / "run.json").read_text())
    assert record["status"] == "completed", record.get("error")
    rows = [json.loads(line) for line in
            (tmp_path / "proxied" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows)
    assert read_record(fed_dir)["state"] == "stopped"
    assert not [pid for pid in nginx_family if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
