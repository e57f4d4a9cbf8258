"""The one "does this adapter fit" check: tensor names, shapes, optionally dtypes and finiteness,
against what a model (or the server's reference adapter) expects. Standard library only, so that
the server, the client, the resume check and the evaluation share it whatever array type they
hold (torch tensors, numpy arrays, Flower Arrays or bare shapes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def shape_of(value: Any) -> tuple[int, ...]:
    """The shape of an array-like (anything with .shape) or of a shape given as a sequence."""
    return tuple(int(n) for n in (value.shape if hasattr(value, "shape") else value))


def _first(names: list[str], limit: int) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[0] if len(names) == 1 else names[:limit]}{more}"


def adapter_mismatch(
    tensors: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    is_finite: Callable[[Any], bool] | None = None,
    dtype_of: Callable[[Any], Any] | None = None,
    limit: int = 3,
) -> str | None:
    """Why `tensors` does not fit `expected`, or None when it does.

    Both map tensor names to arrays or shapes. Checked in order, the first failing check gives the
    reason: the same names ("wrong keys: missing [...], unexpected [...]"), the same shapes
    ("wrong shape for NAME: (..), expected (..)"), with `dtype_of` the same dtypes ("wrong dtype
    for NAME: ..., expected ..."; `expected` must then hold arrays), with `is_finite` only finite
    values ("non-finite values in NAME").
    """
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:limit]
        extra = sorted(set(tensors) - set(expected))[:limit]
        return f"wrong keys: missing {missing}, unexpected {extra}"
    names = sorted(tensors)
    shapes = [k for k in names if shape_of(tensors[k]) != shape_of(expected[k])]
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        return (f"wrong shape for {k}: {shape_of(tensors[k])}, expected "
                f"{shape_of(expected[k])}{more}")
    if dtype_of is not None:
        dtypes = [k for k in names if dtype_of(tensors[k]) != dtype_of(expected[k])]
        if dtypes:
            k = dtypes[0]
            return f"wrong dtype for {k}: {dtype_of(tensors[k])}, expected {dtype_of(expected[k])}"
    if is_finite is not None:
        non_finite = [k for k in names if not is_finite(tensors[k])]
        if non_finite:
            return f"non-finite values in {_first(non_finite, limit)}"
    return None
