"""FlexLoRA aggregation (Bai et al., 2024): average the clients' full low-rank products, not
their factors, then project the average back to rank r.

Averaging A and B separately (FedAvg) averages factors whose product is not the average of the
products: mean(B_i) @ mean(A_i) != mean(B_i @ A_i). FlexLoRA averages dW_i = s * B_i @ A_i
weighted by examples and keeps the best rank-r approximation of the average (truncated SVD),
splitting the singular values evenly between the new B and A so both factors keep comparable
norms. The global adapter keeps PEFT's layout and scaling s, so evaluation and the next round
load it unchanged.

The average of K rank-r products has rank at most K*r, so the SVD runs on the factors (QR of the
stacked B's and A's, then the SVD of a (K r) x (K r) core): the same truncated SVD as on the
dense out x in average, at a fraction of its cost; bench/flexlora_cost.py measures both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"


def project_average(b_factors: Sequence[np.ndarray], a_factors: Sequence[np.ndarray],
                    weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B, A (rank r) with B @ A the best rank-r approximation of sum_i w_i B_i @ A_i (weights
    normalised here). PEFT's scale s (alpha / r, or alpha / sqrt(r) with rsLoRA) multiplies
    every product and the result alike, so it cancels."""
    rank = a_factors[0].shape[0]
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    # sum_i w_i B_i A_i = [w_1 B_1 ... w_K B_K] @ [A_1; ...; A_K]
    stacked_b = np.concatenate([w * b.astype(np.float64) for w, b in
                                zip(weights, b_factors, strict=True)], axis=1)
    stacked_a = np.concatenate([a.astype(np.float64) for a in a_factors], axis=0)
    q_b, r_b = np.linalg.qr(stacked_b)
    q_a, r_a = np.linalg.qr(stacked_a.T)
    u, sigma, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    root = np.sqrt(sigma[:rank])
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vt[:rank] @ q_a.T)
    if new_b.shape[1] < rank:  # fewer singular values than r: a layer narrower than the rank
        new_b = np.pad(new_b, ((0, 0), (0, rank - new_b.shape[1])))
        new_a = np.pad(new_a, ((0, rank - new_a.shape[0]), (0, 0)))
    return new_b.astype(np.float32), new_a.astype(np.float32)


def flexlora_aggregate(states: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
                       ) -> dict[str, np.ndarray]:
    """The global adapter from the clients' adapters: every LoRA pair by `project_average`,
    every other tensor (DoRA's magnitude vectors) by the weighted average."""
    weights = np.asarray(weights, dtype=np.float64)
    merged: dict[str, np.ndarray] = {}
    for name in states[0]:
        if name.endswith(LORA_A):
            pair = name[: -len(LORA_A)] + LORA_B
            if pair not in states[0]:
                raise ValueError(f"FlexLoRA: {name} has no {LORA_B} partner in the adapter")
            merged[pair], merged[name] = project_average(
                [s[pair] for s in states], [s[name] for s in states], weights)
        elif not name.endswith(LORA_B):
            stacked = np.stack([s[name].astype(np.float64) for s in states])
            merged[name] = (np.tensordot(weights / weights.sum(), stacked, axes=1)
                            .astype(np.float32))
    return {name: merged[name] for name in states[0]}  # PEFT's key order
