"""The run's random streams: the data order and augmentation of each epoch, seeded by
``(cfg.seed, epoch)`` alone, and the global torch RNG (PGD random starts inside losses, dropout),
saved in every checkpoint and restored on resume, one stream per rank under DDP."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from kdiga.distributed import DistInfo, rank_seed

# one logger for the training package: the stage logs name its lines kdiga.train
logger = logging.getLogger("kdiga.train")

_AUG_SEED_OFFSET = 500009  # keeps the augmentation stream apart from the data-order stream


def epoch_generators(seed: int, epoch: int) -> tuple[torch.Generator, torch.Generator]:
    """(data order, augmentation) generators of epoch ``epoch`` (0-based), for any seed >= 0:
    the generator seeds wrap at 2**64 (no wrap below seed 1.8e13: runs keep their bytes)."""
    base = (int(seed) * 1000003 + int(epoch)) % 2**64
    return (
        torch.Generator().manual_seed(base),
        torch.Generator().manual_seed((base + _AUG_SEED_OFFSET) % 2**64),
    )


def rng_state(cuda_index: int | None) -> dict[str, Any]:
    """This process's global RNG state (CPU, and the CUDA device's when training there)."""
    cuda = None if cuda_index is None else torch.cuda.get_rng_state(cuda_index)
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def seed_rng(seed: int, cuda_index: int | None) -> None:
    torch.default_generator.manual_seed(seed)
    if cuda_index is not None:
        torch.cuda.default_generators[cuda_index].manual_seed(seed)


def restore_rng(
    rng: Mapping[str, Any], info: DistInfo, fallback_seed: int, cuda_index: int | None
) -> None:
    """Restore this rank's RNG stream from a checkpoint's ``rng``.

    A checkpoint of another world size holds no stream for ranks > 0: they are re-seeded
    (``fallback_seed``) and the run is no longer bit-identical to an uninterrupted one.
    """
    ranks = rng.get("ranks") or [rng]
    if len(ranks) != info.world_size:
        if info.rank == 0:
            logger.warning(
                "checkpoint was written by %d process(es), resumed by %d: the RNG streams "
                "of ranks > 0 are re-seeded",
                len(ranks),
                info.world_size,
            )
        if info.rank > 0:
            seed_rng(rank_seed(fallback_seed, info.rank), cuda_index)
            return
    own = ranks[info.rank] if len(ranks) == info.world_size else rng
    torch.set_rng_state(own["torch"])
    if cuda_index is not None and own.get("cuda") is not None:
        torch.cuda.set_rng_state(own["cuda"], cuda_index)
