"""Command line: `python -m flowertune_nlp.federation {credentials,proxy-config,up,status,down}`."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from flowertune_nlp.federation.credentials import (
    LOOPBACK_NAMES,
    CredentialsExist,
    make_credentials,
)
from flowertune_nlp.federation.local import BIN, DEFAULT_NAME, LocalFederation
from flowertune_nlp.federation.processes import (
    FederationError,
    federation_status,
    stop_federation,
)
from flowertune_nlp.federation.proxy import render_site
from flowertune_nlp.io import atomic_write_text
from flowertune_nlp.warm_nodes import WARM_KEY

PROTOTYPE_NOTE = ("prototype credentials: the CA key lies next to what it signs; "
                  "in production use your organisation's PKI")


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def cmd_credentials(args: argparse.Namespace) -> int:
    hosts = [h for h in args.hosts.split(",") if h.strip()]
    try:
        creds = make_credentials(Path(args.out), hosts, args.nodes, force=args.force,
                                 days=args.days)
    except (CredentialsExist, ValueError) as err:
        _err(str(err))
        return 1
    print(f"wrote {creds.directory} (0700): ca.crt ca.key; server.pem server.key (the "
          f"SuperLink on loopback: {', '.join(LOOPBACK_NAMES)}); proxy.pem proxy.key (the "
          f"Fleet proxy: {', '.join(hosts)})" + "".join(
              f" node-{i} node-{i}.pub" for i in range(1, args.nodes + 1)))
    print(PROTOTYPE_NOTE)
    return 0


def cmd_proxy_config(args: argparse.Namespace) -> int:
    try:
        text = render_site(args.listen, args.superlink, Path(args.certificate), Path(args.key),
                           Path(args.ca), superlink_name=args.superlink_name)
    except ValueError as err:
        _err(str(err))
        return 2
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(Path(args.out), text)
        print(f"wrote {args.out}: TLS on {args.listen}, only POST /v1/fleet/* forwarded to "
              f"{args.superlink}; check it with `nginx -t`, then `systemctl reload nginx`")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    if len(args.node_config) > args.nodes:
        _err(f"{len(args.node_config)} --node-config given for {args.nodes} nodes")
        return 2
    specs = list(args.node_config) + [
        f"partition-id={i} num-partitions={args.num_partitions}"
        for i in range(len(args.node_config), args.nodes)]
    if args.cold:
        specs = [f"{spec} {WARM_KEY}=false" for spec in specs]
    try:
        threads = args.threads_per_node or max(1, (os.cpu_count() or 1) // args.nodes)
        federation = LocalFederation(Path(args.dir), specs, args.name,
                                     jemalloc=not args.no_jemalloc, timeout=args.timeout,
                                     echo=lambda m: print(m, file=sys.stderr),
                                     threads_per_node=threads, proxy=args.proxy)
        federation.up()
    except (FederationError, CredentialsExist, ValueError) as err:
        _err(str(err))
        return 1
    except KeyboardInterrupt:
        _err("interrupted; stopped what had been started")
        return 130
    home = shlex.quote(str(federation.flwr_home))
    flwr = shlex.quote(str(BIN / "flwr"))
    names = ", ".join(f"{n.name} (pid {n.pid})" for n in federation.nodes)
    proxy = (f"; SuperNodes dial the Fleet proxy {federation.proxy_address} (nginx, TLS, Fleet "
             f"API only, pid {federation.proxy_process.pid})" if federation.proxy_process
             else "")
    print(f"Federation '{federation.federation_name}' is up: SuperLink "
          f"{federation.superlink_address} (TLS, SuperNode auth, pid {federation.superlink.pid})"
          f"{proxy}, {len(federation.nodes)} SuperNodes online: {names}.\n"
          f"Logs: {federation.logs}/\n\n"
          f"Run the app on it (from the repository root):\n"
          f"  FLWR_HOME={home} {flwr} run . {federation.federation_name} --stream "
          f"--run-config configs/cpu-smoke.toml\n"
          f"List runs / stop one:\n"
          f"  FLWR_HOME={home} {flwr} ls {federation.federation_name}\n"
          f"  FLWR_HOME={home} {flwr} stop <run-id> {federation.federation_name}\n"
          f"Stop the federation:\n"
          f"  {shlex.quote(sys.executable)} -m flowertune_nlp.federation down --dir "
          f"{shlex.quote(str(federation.directory))}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        left = stop_federation(Path(args.dir), grace=args.grace)
    except FederationError as err:
        _err(str(err))
        return 1
    if left:
        _err("still running after SIGKILL:\n  " + "\n  ".join(left))
        return 1
    print(f"nothing from {Path(args.dir).resolve()} is running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        record = federation_status(Path(args.dir))
    except FederationError as err:
        _err(str(err))
        return 1
    if not record.get("processes"):
        print(f"no federation recorded in {Path(args.dir).resolve()}")
        return 0
    fleet = record.get("fleet_address")
    via = (f", nodes dial the Fleet proxy {fleet}"
           if fleet and fleet != record.get("address") else "")
    print(f"federation {record['federation']} at {record.get('address')}{via} "
          f"(recorded state: {record['state']}); FLWR_HOME={record['flwr_home']}")
    for entry in record["processes"]:
        extra = f" node-id {entry['node_id']}" if entry.get("node_id") else ""
        print(f"  {entry['name']:<16} pid {entry['pid']:<8} "
              f"{'running' if entry['running'] else 'stopped':<8} port {entry.get('port')}"
              f"{extra}  log {entry['log']}")
        for child in entry["children"]:
            print(f"      + {child}")
    for stray in record["stray"]:
        print(f"  (orphan) {stray}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowertune_nlp.federation",
                                     description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    creds = sub.add_parser("credentials", help="make a CA, the SuperLink certificate and node "
                           "key pairs (prototyping only)")
    creds.add_argument("--out", required=True, help="folder to write them to")
    creds.add_argument("--hosts", default="127.0.0.1,localhost",
                       help="comma-separated public host names/IPs the SuperNodes dial: the "
                       "Fleet proxy's certificate names them (the SuperLink's own certificate "
                       "always names 127.0.0.1 and localhost)")
    creds.add_argument("--nodes", type=int, default=3, help="node key pairs to make")
    creds.add_argument("--days", type=int, default=365, help="certificate validity")
    creds.add_argument("--force", action="store_true", help="replace existing credentials")
    creds.set_defaults(func=cmd_credentials)

    proxy = sub.add_parser("proxy-config", help="write the nginx site that exposes only the "
                           "Fleet API of a loopback SuperLink (multi-machine recipe)")
    proxy.add_argument("--listen", default="0.0.0.0:8000",
                       help="public address:port the SuperNodes dial (default 0.0.0.0:8000)")
    proxy.add_argument("--superlink", default="127.0.0.1:8001",
                       help="the SuperLink's loopback address:port (default 127.0.0.1:8001)")
    proxy.add_argument("--certificate", required=True,
                       help="the proxy's certificate (proxy.pem: names the public hosts)")
    proxy.add_argument("--key", required=True, help="its private key (proxy.key)")
    proxy.add_argument("--ca", required=True,
                       help="CA certificate that signed the SuperLink's certificate (ca.crt)")
    proxy.add_argument("--superlink-name", default="localhost",
                       help="DNS name the SuperLink's certificate must carry (nginx checks "
                       "names, not IP addresses; default localhost)")
    proxy.add_argument("--out", default="-", help="file to write (default: stdout)")
    proxy.set_defaults(func=cmd_proxy_config)

    up = sub.add_parser("up", help="start a SuperLink and N SuperNodes on loopback (TLS, auth)")
    up.add_argument("--dir", required=True, help="credentials, state, logs and the record")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--node-config", action="append", default=[],
                    help="node-config of the i-th node (repeatable), e.g. "
                    "'data-path=\"/abs/a.jsonl\"' or 'partition-id=0 num-partitions=3'; "
                    'name="site-i" is added unless given')
    up.add_argument("--num-partitions", type=int, default=20,
                    help="a node given no --node-config serves partition i-1 of this many of "
                    "the run's static.dataset.name (a benchmark federation; default 20, the "
                    "app's default static.dataset.num-partitions)")
    up.add_argument("--threads-per-node", type=int, default=None,
                    help="CPU threads each node's ClientApps use (default: this machine's cores "
                    "divided among the nodes, at least 1; nodes on one machine that each use "
                    "every core slow each other down several times)")
    up.add_argument("--name", default=DEFAULT_NAME, help="federation name for `flwr run`")
    up.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the SuperLink and the nodes")
    up.add_argument("--cold", action="store_true",
                    help=f"every node runs each message in Flower's fresh process, importing "
                    f"and loading the model again ({WARM_KEY}=false in its node config); "
                    "default: warm nodes, whose worker process keeps them between messages")
    up.add_argument("--no-jemalloc", action="store_true",
                    help="do not preload jemalloc into the Flower processes")
    up.add_argument("--proxy", action="store_true",
                    help="the multi-machine layout on loopback: SuperNodes reach the SuperLink "
                    "only through an nginx Fleet proxy on its own port (TLS, Fleet API only; "
                    "needs `apt-get install nginx`)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop everything `up` started in --dir")
    down.add_argument("--dir", required=True)
    down.add_argument("--grace", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="what `up` started in --dir, and whether it runs")
    status.add_argument("--dir", required=True)
    status.set_defaults(func=cmd_status)

    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a failing `up` still stops what it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
