"""Command line: `python -m flowertune_nlp.federation {credentials,up,status,down}`."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from flowertune_nlp.federation.credentials import CredentialsExist, make_credentials
from flowertune_nlp.federation.local import BIN, DEFAULT_NAME, LocalFederation
from flowertune_nlp.federation.processes import (
    FederationError,
    federation_status,
    stop_federation,
)

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
    print(f"wrote {creds.directory}: ca.crt ca.key server.pem server.key (SANs: "
          f"{', '.join(hosts)})" + "".join(f" node-{i} node-{i}.pub"
                                           for i in range(1, args.nodes + 1)))
    print(PROTOTYPE_NOTE)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    if len(args.node_config) > args.nodes:
        _err(f"{len(args.node_config)} --node-config given for {args.nodes} nodes")
        return 2
    specs = list(args.node_config) + [
        f"partition-id={i} num-partitions={args.num_partitions}"
        for i in range(len(args.node_config), args.nodes)]
    try:
        threads = args.threads_per_node or max(1, (os.cpu_count() or 1) // args.nodes)
        federation = LocalFederation(Path(args.dir), specs, args.name,
                                     jemalloc=not args.no_jemalloc, timeout=args.timeout,
                                     echo=lambda m: print(m, file=sys.stderr),
                                     threads_per_node=threads)
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
    print(f"Federation '{federation.federation_name}' is up: SuperLink "
          f"{federation.superlink_address} (TLS, SuperNode auth, pid {federation.superlink.pid})"
          f", {len(federation.nodes)} SuperNodes online: {names}.\n"
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
    print(f"federation {record['federation']} at {record.get('address')} "
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
                       help="comma-separated host names/IPs the SuperLink is dialled at (SANs)")
    creds.add_argument("--nodes", type=int, default=3, help="node key pairs to make")
    creds.add_argument("--days", type=int, default=365, help="certificate validity")
    creds.add_argument("--force", action="store_true", help="replace existing credentials")
    creds.set_defaults(func=cmd_credentials)

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
    up.add_argument("--no-jemalloc", action="store_true",
                    help="do not preload jemalloc into the Flower processes")
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
