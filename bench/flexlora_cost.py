"""What FlexLoRA's SVD costs per round on a 7B model's q/v projections (Qwen2.5-7B: 28 layers,
q_proj 3584x3584, v_proj 512x3584), rank 32, for K clients per round: the factored projection
the app uses (flexlora.project_average: QR of the stacked factors, SVD of a Kr x Kr core) next to
a dense truncated SVD of the averaged out x in product, in one run, and the largest difference
between the two products.

    python bench/flexlora_cost.py --clients 2 --layers 28
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from flowertune_nlp.flexlora import project_average

SHAPES = {"q_proj": (3584, 3584), "v_proj": (512, 3584)}  # (out, in)


def dense(b_factors, a_factors, weights):
    weights = np.asarray(weights) / np.sum(weights)
    mean = sum(w * b.astype(np.float64) @ a for w, b, a in
               zip(weights, b_factors, a_factors, strict=True))
    u, sigma, vt = np.linalg.svd(mean, full_matrices=False)
    rank = a_factors[0].shape[0]
    root = np.sqrt(sigma[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--dense-layers", type=int, default=2,
                        help="layers timed with the dense SVD (scaled to --layers)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result = {"clients": args.clients, "rank": args.rank, "layers": args.layers}
    for name, (out_features, in_features) in SHAPES.items():
        bs = [rng.normal(size=(out_features, args.rank)).astype(np.float32) * 0.01
              for _ in range(args.clients)]
        as_ = [rng.normal(size=(args.rank, in_features)).astype(np.float32) * 0.02
               for _ in range(args.clients)]
        weights = rng.integers(10, 100, size=args.clients)
        start = time.perf_counter()
        for _ in range(args.dense_layers):
            factored = project_average(bs, as_, weights)
        factored_s = (time.perf_counter() - start) / args.dense_layers
        start = time.perf_counter()
        for _ in range(args.dense_layers):
            reference = dense(bs, as_, weights)
        dense_s = (time.perf_counter() - start) / args.dense_layers
        gap = float(np.abs(factored[0] @ factored[1] - reference[0] @ reference[1]).max())
        result[name] = {"factored_seconds_per_layer": round(factored_s, 4),
                        "dense_seconds_per_layer": round(dense_s, 4),
                        "max_abs_difference_of_products": gap}
    result["factored_seconds_per_round"] = round(sum(
        result[n]["factored_seconds_per_layer"] for n in SHAPES) * args.layers, 2)
    result["dense_seconds_per_round"] = round(sum(
        result[n]["dense_seconds_per_layer"] for n in SHAPES) * args.layers, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
