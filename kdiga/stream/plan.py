"""The plan of an epoch, the rule every rank computes alike from the shard counts:

1. Shard order: the written order for evaluation; for training a permutation seeded by
   (seed, epoch).
2. Shards go to ranks, then each rank's shards to its ``max(workers, 1)`` worker streams:
   taking the shards in that order, each goes to the rank (then stream) holding the fewest
   samples so far, ties to the lowest index. The split is per shard.
3. Steps per epoch, the same on every rank (so uneven shards cannot hang DDP):

   - training: ``N // (batch_size * world_size)`` for N samples in all. Rank batch ``i``
     comes from stream ``i % K`` (K streams), so stream ``w`` owes ``ceil((steps - w) / K)``
     full batches. It reads its shards in order, wrapping around to its own first sample if
     it runs short and stopping when it has enough (a rank's surplus is left out this epoch;
     another order leaves out others next epoch), then passes the samples through a shuffle
     buffer of ``shuffle_buffer`` samples seeded by (seed, epoch, rank, stream).
   - evaluation: every sample exactly once over all ranks, in the written order within each
     stream. ``steps`` is the least count for which every stream's samples fit in the batches
     it owes; every batch has ``batch_size`` rows, and rows past a stream's last sample are
     padding: zero images with label :data:`kdiga.stream.PAD_LABEL` (-100, the default
     ``ignore_index`` of ``F.cross_entropy``) and key ``""``. Count correct predictions where
     ``y != PAD_LABEL`` and sum over ranks.

   Training needs every stream to hold a sample: at least ``world_size * max(workers, 1)``
   non-empty shards. A training crop and flip are drawn from a generator seeded by
   (seed, epoch, sample key, pass), pass 0 unless a stream wrapped around, so they do not
   depend on which worker decodes the sample nor when.

The order is thus a pure function of (seed, epoch, world_size, workers, batch_size) and the
shard counts; ``workers=0`` (decoding in the main process) gives the order of ``workers=1``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from kdiga.shards import ShardError
from kdiga.stream.seeds import mix


@dataclass(frozen=True)
class WorkerStream:
    """One worker stream of one rank: its shards (indices), their samples, the batches owed."""

    shards: tuple[int, ...]
    samples: int
    batches: int


def owed(steps: int, w: int, k: int) -> int:
    """How many of the batches ``0..steps-1`` stream ``w`` of ``k`` gives (batch i: i % k)."""
    return max(0, (steps - w + k - 1) // k)


def _balance(items: Sequence[int], counts: Sequence[int], parts: int) -> list[list[int]]:
    """Each item, in order, to the part with the fewest samples so far (ties: lowest part)."""
    out: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in items:
        p = min(range(parts), key=lambda j: (load[j], j))
        out[p].append(i)
        load[p] += counts[i]
    return out


def plan_epoch(
    counts: Sequence[int],
    *,
    train: bool,
    batch_size: int,
    world_size: int,
    workers: int,
    seed: int,
    epoch: int,
) -> tuple[int, list[list[WorkerStream]]]:
    """(steps per epoch, ``streams[rank][w]``): the rule of this module's docstring."""
    k = max(workers, 1)
    order = list(range(len(counts)))
    if train:
        random.Random(mix("shards", seed, epoch)).shuffle(order)
    layout = [_balance(r, counts, k) for r in _balance(order, counts, world_size)]
    sizes = [[sum(counts[i] for i in s) for s in rank] for rank in layout]
    total = sum(counts)
    if train:
        steps = total // (batch_size * world_size)
        if steps < 1:
            raise ValueError(
                f"{total} samples make no training step of batch_size={batch_size} x "
                f"world_size={world_size}"
            )
    else:
        steps = max(
            (
                k * (math.ceil(n / batch_size) - 1) + w + 1
                for rank in sizes
                for w, n in enumerate(rank)
                if n > 0
            ),
            default=0,
        )
        if steps < 1:
            raise ValueError("the shards hold no samples")
    streams = [
        [
            WorkerStream(tuple(s), n, owed(steps, w, k))
            for w, (s, n) in enumerate(zip(rank, ns, strict=True))
        ]
        for rank, ns in zip(layout, sizes, strict=True)
    ]
    if train:
        empty = [
            (r, w)
            for r, rank in enumerate(streams)
            for w, s in enumerate(rank)
            if s.batches > 0 and s.samples == 0
        ]
        if empty:  # a ShardError: one line in a stage, not a traceback
            nonempty = sum(1 for c in counts if c > 0)
            raise ShardError(
                f"training needs at least world_size x max(workers, 1) = {world_size * k} "
                f"non-empty shards (each worker stream of each rank reads whole shards); got "
                f"{nonempty}: write smaller shards or use fewer workers"
            )
    return steps, streams
