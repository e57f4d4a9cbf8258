"""Differential privacy by Flower's own machinery: the server-side DP strategy wrappers around
the aggregation rule, Flower's RDP accountant for the fixed-clipping modes, and, on the
ClientApp, Flower's clipping mods for the client-side modes.

Flower's accountant holds when the rule averages plainly (config.py allows fedavg/fedprox
only), the same number of clients reply every round (the round driver sends exactly that many
and Flower releases nothing from a round with a failure) and every reply weighs the same (the
driver gives each accepted reply weight 1 when privacy is on).

The noise those wrappers add is drawn from a generator keyed by a 256-bit secret of the run and
the round (`round_noise`): nobody without the secret can regenerate it from published
checkpoints, and a resumed run, which reads the secret from its private state, draws the same.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from flowertune_nlp import messages as wire
from flowertune_nlp.config import AppConfig

log = logging.getLogger(__name__)
NOISE_SECRET = "noise_secret"  # in the saved rule values: the secret behind the DP noise
LEGACY_NOISE_SEED = "noise_seed"  # what states saved before it were given: a 63-bit secret


def private(rule: Strategy, config: AppConfig, clients_per_round: int, population: int
            ) -> Strategy:
    """`rule` in Flower's DP wrapper for `privacy.mode`, with Flower's RDP accountant for the
    fixed-clipping modes (Flower's adaptive wrappers take none)."""
    p = config.privacy
    if p.mode == "off":
        return rule
    args = (rule, p.noise_multiplier)
    if p.mode.endswith("adaptive"):
        wrapper = (DifferentialPrivacyClientSideAdaptiveClipping if p.mode.startswith("client")
                   else DifferentialPrivacyServerSideAdaptiveClipping)
        return wrapper(*args, clients_per_round, initial_clipping_norm=p.clipping_norm,
                       clipped_count_stddev=p.clipped_count_stddev or None)
    wrapper = (DifferentialPrivacyClientSideFixedClipping if p.mode.startswith("client")
               else DifferentialPrivacyServerSideFixedClipping)
    accountant = None
    if p.noise_multiplier > 0:  # without noise there is no finite epsilon to account
        from flwr.serverapp import (
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )

        # Sources are sampled by (seed, round), not by a secret Poisson draw, so no sampling
        # amplification is claimed: each round counts as a full Gaussian release.
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=p.target_delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return wrapper(*args, p.clipping_norm, clients_per_round, accountant=accountant)


NOISE_SECRET_BITS = 256


def new_noise_secret() -> str:
    """A fresh secret behind a run's DP noise (hex), from the OS's cryptographic source."""
    return secrets.token_hex(NOISE_SECRET_BITS // 8)


def noise_seed(secret: str, server_round: int) -> np.random.SeedSequence:
    """The seed of a round's noise: every bit of the secret and the round number, in a
    SeedSequence whose pool is as wide as the secret, so the noise is not a function of any
    value narrower than the secret (a 32-bit seed can be searched in hours)."""
    return np.random.SeedSequence(int(secret, 16), spawn_key=(server_round,),
                                  pool_size=NOISE_SECRET_BITS // 32)


@contextmanager
def round_noise(secret: str, server_round: int) -> Iterator[None]:
    """Key NumPy's global generator by (secret, round) while the rule aggregates, then put it
    back as it was.

    Flower's DP wrappers draw the Gaussian noise (and adaptive clipping its noisy count) from
    NumPy's global generator (`np.random.normal`) and take no generator of their own, so the
    wrappers stay as Flower ships them and their generator's state is set here instead. It is
    restored afterwards so that nothing drawn later from the global generator continues the
    noise's stream (MT19937's state can be recovered from its outputs and run backwards)."""
    saved = np.random.get_state()
    np.random.set_state(np.random.MT19937(noise_seed(secret, server_round)).state)
    try:
        yield
    finally:
        np.random.set_state(saved)


class PrivacyPolicy:
    """The server's DP rules of one run, in one place: the same clients every round, the
    epsilon budget, equal reply weights, the noise secret and its keyed generator, the guard of
    the adaptive wrappers against empty rounds, and the epsilon spent so far.

    `rule` is the DP-wrapped rule and `accountant` Flower's accountant inside it (None: no
    noise, or adaptive clipping). `saved_values` are the rule values of a resumed run's state;
    the secret is taken out of them (the rest is the rule's own)."""

    def __init__(self, config: AppConfig, rule: Strategy, accountant=None,
                 saved_values: dict | None = None) -> None:
        self.config = config.privacy
        self.population = config.dataset.num_partitions
        self.rule = rule
        self.accountant = accountant
        values = saved_values if saved_values is not None else {}
        if values.pop(LEGACY_NOISE_SEED, None) is not None:
            log.warning("the saved state's DP noise secret is from an older version (seeded "
                        "through 32 bits); the rounds from now on draw noise from a new secret")
        self.secret: str = values.pop(NOISE_SECRET, None) or new_noise_secret()

    @property
    def on(self) -> bool:
        return self.config.mode != "off"

    @property
    def equal_weights(self) -> bool:
        """Flower's DP wrappers bound each client's influence by the clipping norm only when
        every reply weighs the same; with DP on, replies are averaged unweighted."""
        return self.on

    def refusal(self, server_round: int, assigned: int, planned: int) -> str | None:
        """Why round `server_round` must not start with `assigned` clients, or None: the
        accountant holds only for the same number of clients every round, and the round's
        release must stay within `privacy.max-epsilon`. The caller adds how to resume."""
        if not self.on:
            return None
        if assigned != planned:
            return (f"round {server_round}: privacy.mode = {self.config.mode!r} needs the same "
                    f"{planned} clients every round (static.dataset.num-partitions x "
                    f"strategy.fraction-train), but {assigned} were assigned; in a deployment "
                    "set static.dataset.num-partitions to the number of nodes")
        if self._would_exceed_budget(assigned):
            return (f"round {server_round}: its release would take the spent epsilon "
                    f"({self.spent()['privacy_epsilon']:.4g} at delta "
                    f"{self.config.target_delta:g}) past privacy.max-epsilon = "
                    f"{self.config.max_epsilon:g}; the adapter of round {server_round - 1} is "
                    "the run's result (resume with a larger budget to train on)")
        return None

    def _would_exceed_budget(self, clients_per_round: int) -> bool:
        """The budget is checked here, not in Flower's PrivacyConfig, so that a run stopped by
        it can be resumed with a larger budget (Flower's accountant refuses saved state whose
        config differs)."""
        from flwr.serverapp import GaussianPrivacyEvent

        if self.accountant is None or not self.config.max_epsilon:
            return False
        event = GaussianPrivacyEvent(noise_multiplier=self.config.noise_multiplier,
                                     sample_size=clients_per_round,
                                     population_size=self.population)
        return self.accountant.would_exceed(event, max_epsilon=self.config.max_epsilon)

    def aggregate(self, server_round: int, replies: Sequence[Message]
                  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The rule's aggregate of `replies`, its DP noise drawn from (secret, round): the
        secret is drawn at the start of the run and kept in the private state/ only, never in
        run.json or the config, so the noise cannot be regenerated from anything published,
        and a resumed run draws the same. No aggregate of an empty round under an adaptive
        wrapper: Flower's adaptive wrappers divide by the number of replies."""
        if not replies and self.config.mode.endswith("adaptive"):
            return None, None
        with round_noise(self.secret, server_round) if self.on else contextlib.nullcontext():
            return self.rule.aggregate_train(server_round, list(replies))

    def spent(self) -> dict:
        """Epsilon and delta spent so far (Flower's accountant), for metrics and run.json."""
        if not self.on:
            return {}
        if self.accountant is None:  # no noise, or adaptive clipping: Flower accounts nothing
            return {"privacy_epsilon": None, "privacy_delta": None}
        spent = self.accountant.get_privacy_spent()
        return {"privacy_epsilon": spent.epsilon, "privacy_delta": spent.delta}

    def state_values(self) -> dict:
        """What the run's private state keeps of the policy: the secret, when DP is on."""
        return {NOISE_SECRET: self.secret} if self.on else {}


def client_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixed or adaptive clipping mod on train messages of a client-side privacy mode.

    Flower's mods refuse any message without a clipping norm (queries, and every train message
    of a run without client-side DP), so the ClientApp cannot list them as its mods directly;
    this one applies them where the server's wrapper sent a clipping norm."""
    if msg.metadata.message_type == MessageType.TRAIN:
        mode = msg.content.config_records[wire.CONFIG].get(wire.PRIVACY_MODE, "off")
        if mode == "client-fixed":
            return fixedclipping_mod(msg, context, call_next)
        if mode == "client-adaptive":
            return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)
