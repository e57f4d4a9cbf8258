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

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import Context, Message, MessageType
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


def would_exceed_budget(accountant, config: AppConfig, clients_per_round: int) -> bool:
    """Whether one more round's release would take the spent epsilon past
    `privacy.max-epsilon`. The budget is checked here, not in Flower's PrivacyConfig, so that a
    run stopped by it can be resumed with a larger budget (Flower's accountant refuses saved
    state whose config differs)."""
    from flwr.serverapp import GaussianPrivacyEvent

    p = config.privacy
    if accountant is None or not p.max_epsilon:
        return False
    event = GaussianPrivacyEvent(noise_multiplier=p.noise_multiplier,
                                 sample_size=clients_per_round,
                                 population_size=config.dataset.num_partitions)
    return accountant.would_exceed(event, max_epsilon=p.max_epsilon)


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


def uses_equal_weights(config: AppConfig) -> bool:
    """Flower's DP wrappers bound each client's influence by the clipping norm only when every
    reply weighs the same; with DP on, replies are averaged unweighted."""
    return config.privacy.mode != "off"


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
