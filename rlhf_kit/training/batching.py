"""Batch-size arithmetic: global batch = micro batch x gradient accumulation x world size."""

from __future__ import annotations


def resolve_batch_sizes(global_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """Number of gradient-accumulation steps that makes ``micro_batch * accum * world_size == global_batch``.

    Raises ``ValueError`` with a one-line explanation when the sizes are not positive or do not divide.
    """
    for name, value in (
        ("global batch", global_batch),
        ("micro batch", micro_batch),
        ("world size", world_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_step = micro_batch * world_size
    if global_batch % per_step != 0:
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch} x world size "
            f"{world_size} = {per_step}"
        )
    return global_batch // per_step
