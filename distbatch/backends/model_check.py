"""Did every rank build the same model and optimizer? Compared by position, not by name.

Keras names layers from a process-wide counter, so a rank that built one extra layer
earlier (a rank-0-only baseline, a summary model, a reloaded checkpoint) names the same
model's variables differently. Names are therefore only shown, never matched: variable i
of every rank must have the shape and dtype of rank 0's variable i, and every rank the same
number of variables (model first, then the optimizer's).
"""
from __future__ import annotations

import json


def signature(model, optimizer) -> list[list]:
    """[[owner, path, shape, dtype], ...] of model.variables then optimizer.variables."""
    rows = []
    for owner, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
        for v in variables:
            rows.append([owner, str(getattr(v, "path", None) or v.name),
                         [int(d) if d is not None else -1 for d in v.shape], str(v.dtype)])
    return rows


def encode(rows: list[list]) -> bytes:
    return json.dumps(rows, separators=(",", ":")).encode()


def _show(row) -> str:
    owner, path, shape, dtype = row
    return f"{owner} variable '{path}' {tuple(shape)} {dtype}"


def first_mismatch(signatures: list[list[list]]) -> str | None:
    """One line naming the first variable where a rank differs from rank 0, else None.

    signatures[r] is rank r's signature(); the same line comes out on every rank."""
    ref = signatures[0]
    for rank, rows in enumerate(signatures[1:], start=1):
        for i, (mine, theirs) in enumerate(zip(rows, ref)):
            if mine[0] != theirs[0] or mine[2:] != theirs[2:]:
                return (f"horovod: the ranks built different models: variable {i} is "
                        f"{_show(mine)} on rank {rank} but {_show(theirs)} on rank 0; every rank "
                        f"must build the same model and optimizer")
        if len(rows) != len(ref):
            i = min(len(rows), len(ref))
            extra = rows[i] if len(rows) > len(ref) else ref[i]
            who = rank if len(rows) > len(ref) else 0
            return (f"horovod: the ranks built different models: rank {rank} has {len(rows)} "
                    f"variables, rank 0 has {len(ref)}; the first extra one is {_show(extra)} "
                    f"on rank {who}; every rank must build the same model and optimizer")
    return None
