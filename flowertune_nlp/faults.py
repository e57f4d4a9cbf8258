"""Deliberate faults, selected by the `faults.inject` run-config key, so tests (and users checking
their own deployment) can watch the run survive them through a real Flower simulation.

The key is a comma-separated list of `KIND:PARTITION:ROUND` entries; `*` matches any partition
or round; a poisoning kind may carry its strength as `KIND=VALUE`. Client kinds act in the
ClientApp of that partition in that round:

- `raise`  the client raises before training (as an out-of-memory error or bad data would);
- `stall`  the client sleeps for a minute before training (tests kill the server meanwhile);
- `nan`    the client replies with a NaN in its adapter;
- `shape`  the client replies with one tensor of the wrong shape;
- `keys`   the client replies with one tensor under a key the model does not have.

Poisoned clients whose replies look well-formed (finite, right keys and shapes), so screening
lets them through, as it must: only the aggregation rule can resist them.

- `scale=F`     the client's update (trained - received) multiplied by F (default 10);
- `signflip`    the update reversed (received - update);
- `noise=S`     Gaussian noise of standard deviation S (default 0.1) added to every entry of
  the trained adapter, drawn from (seed, round, partition).

Server kind (PARTITION must be `*`):

- `disk-full` the server's saves in that round fail part-way through writing a file, as on a
  full disk (the process's file-size limit is lowered, so the OS itself refuses the write).
"""

from __future__ import annotations

import contextlib
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: config (and the launcher) need none
    import torch

MALFORMED_KINDS = ("nan", "shape", "keys")
POISON_DEFAULTS = {"scale": 10.0, "signflip": None, "noise": 0.1}
CLIENT_KINDS = ("raise", "stall", *MALFORMED_KINDS, *POISON_DEFAULTS)
SERVER_KINDS = ("disk-full",)
STALL_SECONDS = 60.0
DISK_FULL_BYTES = 512  # small enough that any adapter file write fails part-way


class InjectedFault(RuntimeError):
    """Raised by a client told to fail by `faults.inject`."""


@dataclass(frozen=True)
class Fault:
    kind: str
    partition: int | None  # None: every partition
    server_round: int | None  # None: every round
    value: float | None = None  # a poisoning kind's strength

    def matches(self, partition: int | None, server_round: int) -> bool:
        return (self.partition is None or self.partition == partition) and (
            self.server_round is None or self.server_round == server_round
        )


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse `faults.inject`; raise ValueError with the offending entry and the grammar."""
    faults = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        fields = entry.split(":")
        grammar = (f"expected KIND:PARTITION:ROUND with KIND one of "
                   f"{', '.join(CLIENT_KINDS + SERVER_KINDS)} (scale=F and noise=S take a "
                   f"strength) and '*' or an integer for PARTITION and ROUND, e.g. 'raise:0:2', "
                   f"'scale=10:3:*' or 'disk-full:*:3'")
        kind, _, value = fields[0].partition("=")
        if len(fields) != 3 or kind not in CLIENT_KINDS + SERVER_KINDS or (
                value and POISON_DEFAULTS.get(kind) is None):
            raise ValueError(f"fault {entry!r}: {grammar}")
        _, partition, server_round = fields
        try:
            strength = float(value) if value else POISON_DEFAULTS.get(kind)
            fault = Fault(kind, None if partition == "*" else int(partition),
                          None if server_round == "*" else int(server_round), strength)
        except ValueError:
            raise ValueError(f"fault {entry!r}: {grammar}") from None
        if kind in SERVER_KINDS and fault.partition is not None:
            raise ValueError(f"fault {entry!r}: {kind} happens on the server; use '*' as "
                             "PARTITION")
        faults.append(fault)
    return tuple(faults)


def client_fault(faults: tuple[Fault, ...], partition: int | None, server_round: int
                 ) -> Fault | None:
    """The first client fault planned for this partition (None: a node's own data, which only
    `*` matches) and round, if any."""
    for fault in faults:
        if fault.kind in CLIENT_KINDS and fault.matches(partition, server_round):
            return fault
    return None


def before_training(fault: Fault | None, source: str, server_round: int) -> None:
    kind = fault.kind if fault else None
    if kind == "raise":
        raise InjectedFault(f"injected failure (faults.inject) in {source}, round {server_round}")
    if kind == "stall":
        time.sleep(STALL_SECONDS)


def corrupt_reply(kind: str | None, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The malformed adapter a faulty client sends instead of its real one."""
    if kind not in MALFORMED_KINDS:
        return state
    import torch

    state = dict(state)
    key = next(iter(state))
    if kind == "nan":
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    elif kind == "shape":
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    else:
        state[key.replace("lora_A", "lora_Z", 1) + ".injected"] = state.pop(key)
    return state


def poison(fault: Fault | None, trained: dict[str, torch.Tensor],
           received: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The well-formed but poisoned adapter an attacking client sends (see the module doc)."""
    if fault is None or fault.kind not in POISON_DEFAULTS:
        return trained
    import torch

    if fault.kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        return {k: v + fault.value * torch.randn(v.shape, generator=generator, dtype=v.dtype)
                for k, v in trained.items()}
    factor = -1.0 if fault.kind == "signflip" else fault.value
    return {k: received[k] + factor * (v - received[k]) for k, v in trained.items()}


def reply_state(fault: Fault | None, trained: dict[str, torch.Tensor],
                received: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """What a client replies: its trained adapter, or the one its planned fault makes of it."""
    return poison(fault, corrupt_reply(fault.kind if fault else None, trained), received, seed)


def server_disk_full(faults: tuple[Fault, ...], server_round: int) -> bool:
    return any(f.kind == "disk-full" and f.matches(None, server_round) for f in faults)


@contextlib.contextmanager
def simulated_disk_full() -> Iterator[None]:
    """Make every file write past DISK_FULL_BYTES fail with EFBIG ("File too large"), as a
    full disk fails with ENOSPC, and restore the limit afterwards.

    CPython ignores SIGXFSZ at start-up, so the write fails with an error instead of the
    signal killing the process; the check below keeps it that way.
    """
    if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
        raise RuntimeError("cannot simulate a full disk: SIGXFSZ is not ignored in this process")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
