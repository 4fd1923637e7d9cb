"""One training run over several processes (GPUs, nodes): torchrun, DDP, the data split.

Launch one process per GPU with ``torchrun --nproc_per_node=N ...`` (several nodes:
``--nnodes``, ``--node_rank``, ``--rdzv-endpoint``). Each process calls :func:`init_from_env`
first; :func:`kdiga.train.fit` then finds the process group and trains with
``DistributedDataParallel`` (DDP). Only rank 0 writes files (:func:`is_main`)::

    info = init_from_env()  # before anything else touches the GPU
    device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    history = fit(student, criterion, x, y, cfg, device=device, checkpoint_path=shared_path)
    if is_main():
        save_model(student, out_path)
    barrier()
    shutdown()

What a DDP step computes
------------------------
The global batch is ``cfg.batch_size`` = B, drawn from the epoch's permutation exactly as on
one process (a generator seeded with the run's seed and the epoch, identical on all ranks);
rank r of W takes the contiguous slice r of it, B/W samples (:func:`rank_slice`), so the
union of the ranks' slices of a step is the single-process batch. DDP averages the ranks'
parameter gradients, so for a loss that is a MEAN of per-sample terms the update equals the
single-process one on the global batch, up to float summation order: CE, KL with
``batchmean`` (paper eq. 1, 2) and the IGA term with ``iga_reduction="per_sample_mean"``
(eq. 5), its double backward included. A final partial batch of m samples is split as evenly
as possible and each rank's loss is scaled by W·m_r/m, which keeps that equality.

The IGA term's double backward goes through the DDP wrapper: ``torch.autograd.grad(...,
create_graph=True)`` w.r.t. x fires no parameter hook, and the final ``loss.backward()``
accumulates each parameter's gradient once, so DDP's reducer all-reduces once per step
(``find_unused_parameters=False``, ``static_graph=False``; tested on gloo with st, kd, kdiga in
both gradient modes, and ard, whose PGD forwards also go through the wrapper).

Not the same as one process:

- ``iga_reduction="batch_frobenius"``, (1/B²)·sqrt(Σ_i ‖Δg_i‖²), is no mean of per-sample
  terms: computed per rank on B/W samples it would be W^1.5 times the single-process term
  for equal gaps (a silent change of λIGA with the GPU count). :func:`check_run` refuses it
  under DDP; use ``per_sample_mean`` (the conversion is in :mod:`kdiga.losses`) or one process.
- Train-mode BatchNorm normalises with per-rank statistics (running statistics are rank 0's
  after every epoch, :func:`broadcast_buffers`). ``sync_bn=True`` converts the
  student's BatchNorm layers to ``SyncBatchNorm`` (global-batch statistics) for the run; DDP
  accepts SyncBatchNorm on CUDA only, and SyncBatchNorm has no double backward
  (pytorch/pytorch#61222: "derivative for batch_norm_backward_elemt is not implemented"), so
  it cannot be combined with an IGA term whose gradient comes from the train-mode forward
  (``student_grad_mode="train"``); ``"eval"`` works (eval-mode BatchNorm does not sync).
- Randomness inside the loss (PGD random starts, dropout) is drawn from per-rank streams
  (:func:`rank_seed`): the same distribution as one process, other draws. Augmentation is
  drawn for the whole global batch on every rank and then sliced, so it is identical.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global ``rank`` of ``world_size``, ``local_rank`` on its node.

    ``is_distributed`` is True when a process group with ``world_size > 1`` is initialised.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_distributed: bool = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def init_from_env(backend: str | None = None, *, timeout: timedelta | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment; return :class:`DistInfo`.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without
    ``WORLD_SIZE`` (a plain ``python -m ...``) or with ``WORLD_SIZE=1`` nothing is initialised
    and a single-process ``DistInfo`` is returned. With CUDA the process binds to
    ``cuda:LOCAL_RANK`` and the backend is "nccl", otherwise "gloo" (``backend`` overrides).
    Called again after initialisation, it returns the current :class:`DistInfo`.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {BACKENDS} or None (automatic)")
    if dist.is_available() and dist.is_initialized():
        return current()
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(
            f"torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local_rank}; need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and "
            "LOCAL_RANK >= 0"
        )
    if world == 1:
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, is_distributed=False)
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"WORLD_SIZE={world} needs {name} (torchrun sets it)")
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    logger.info(
        "rank %d/%d (local %d) joined the %s process group", rank, world, local_rank, backend
    )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, is_distributed=True)


def shutdown() -> None:
    """Destroy the default process group if one is initialised (end of a torchrun stage)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistInfo:
    """The :class:`DistInfo` of the initialised process group (single-process without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = _env_int("LOCAL_RANK", rank) if world > 1 else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, is_distributed=world > 1)


def is_main() -> bool:
    """True on global rank 0, or when not distributed: the process that writes outputs."""
    return current().rank == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if current().is_distributed:
        dist.barrier()


def rank_slice(batch_len: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of a global batch of ``batch_len`` samples.

    Sizes differ by at most one (the first ``batch_len % world`` ranks take one more), as
    ``torch.tensor_split``; the parts of ranks 0..world-1 tile ``range(batch_len)`` in order.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world}; need world >= 1 and 0 <= rank < world")
    if batch_len < 0:
        raise ValueError(f"batch_len={batch_len} must be >= 0")
    base, extra = divmod(batch_len, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def shard_indices(
    n: int,
    rank: int,
    world: int,
    generator: torch.Generator,
    *,
    batch_size: int,
    drop_last: bool = False,
) -> list[Tensor]:
    """Rank ``rank``'s sample indices of one epoch, one int64 tensor ``[B/W]`` per step.

    The epoch's global permutation is ``torch.randperm(n, generator=generator)``: the same on
    every rank given equally seeded generators. It is cut into global batches of
    ``batch_size`` (the last one partial unless ``drop_last``), and each global batch into
    ``world`` contiguous parts (:func:`rank_slice`); rank r takes part r. So the parts of a
    step are disjoint, of equal size ``batch_size / world`` for every full batch, and their
    union is that step's single-process batch (``world=1`` gives the global batches).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n} and batch_size={batch_size} must both be >= 1")
    rank_slice(0, rank, world)  # validates rank and world
    if batch_size % world:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by world size {world}: every rank "
            "takes batch_size / world samples of each global batch"
        )
    perm = torch.randperm(n, generator=generator)
    stop = n - batch_size + 1 if drop_last else n
    batches = [perm[s : s + batch_size] for s in range(0, stop, batch_size)]
    return [b[rank_slice(b.numel(), rank, world)] for b in batches]


def all_reduce_sum(values: Tensor) -> Tensor:
    """Elementwise sum of ``values`` over all ranks, as a new tensor (a copy when single).

    Not differentiable: for metrics and flags. On NCCL ``values`` must be on this rank's GPU.
    """
    out = values.detach().clone()
    if current().is_distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(values: Tensor) -> Tensor:
    """Elementwise mean of ``values`` over all ranks (every rank counts once)."""
    return all_reduce_sum(values) / current().world_size


def all_reduce_weighted_mean(values: Tensor, weight: float) -> tuple[Tensor, float]:
    """(Σ_r w_r·v_r / Σ_r w_r, Σ_r w_r) over ranks: e.g. per-rank batch means -> global mean.

    ``values`` ``[K]`` (float) are this rank's means over ``weight`` samples.
    """
    packed = torch.cat(
        [
            values.detach().double().reshape(-1) * weight,
            values.new_tensor([weight], dtype=torch.float64),
        ]
    )
    total = all_reduce_sum(packed)
    count = float(total[-1])
    return total[:-1] / count, count


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when single); picklable objects."""
    info = current()
    if not info.is_distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """Raise ``ValueError`` on every rank if ranks hold different ``value`` (``what`` names it)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        raise ValueError(f"ranks disagree on {what}: {values} (rank 0, 1, ...)")


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running stats) into every rank's ``model``.

    Under DDP each rank updates its running stats with its own slice at every train-mode
    forward; after this, evaluation and checkpoints agree on every rank. No-op when single.
    """
    if current().is_distributed:
        for buf in model.buffers():
            dist.broadcast(buf, src)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s global RNG stream: ``seed`` itself on rank 0, distinct others."""
    return (int(seed) + int(rank) * 0x9E3779B97F4A7C15) % 2**64


def check_run(
    n: int,
    batch_size: int,
    drop_last: bool,
    world: int,
    criterion: Any,
    *,
    sync_bn: bool,
    device: torch.device,
) -> None:
    """Raise ``ValueError`` if a run cannot be split over ``world`` ranks as documented above.

    Checks: ``batch_size`` divisible by ``world``; a final partial batch (``drop_last``
    False) of at least ``world`` samples; no ``batch_frobenius`` IGA term; ``sync_bn`` only on
    CUDA and not with a train-mode IGA gradient. Symmetric: every rank raises alike.
    """
    if world <= 1:
        return
    if batch_size % world:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) is not divisible by world size "
            f"{world}: each rank takes batch_size / world samples; pick a multiple of {world}"
        )
    last = n % batch_size
    if not drop_last and 0 < last < world:
        raise ValueError(
            f"the final batch has {last} sample(s) (N={n}, batch_size={batch_size}), fewer "
            f"than the {world} ranks: use drop_last=True"
        )
    method = getattr(criterion, "method", None)
    iga = getattr(method, "iga", False) and criterion.config.iga_weight > 0
    if iga and criterion.config.iga_reduction == "batch_frobenius":
        raise ValueError(
            "iga_reduction='batch_frobenius' is a norm over the whole batch, not a mean of "
            "per-sample terms: under DDP each rank sees B/W samples and the term would differ "
            "from one process (W^1.5 times larger for equal gaps); use "
            "iga_reduction='per_sample_mean' (see kdiga.losses for the conversion) or one process"
        )
    if sync_bn and device.type != "cuda":
        raise ValueError(
            f"sync_bn=True needs CUDA: DDP accepts SyncBatchNorm on GPU modules only "
            f"(device is {device}); use sync_bn=False"
        )
    if sync_bn and iga and criterion.config.student_grad_mode == "train":
        raise ValueError(
            "sync_bn=True with an IGA term from the train-mode forward needs a double backward "
            "through SyncBatchNorm, which PyTorch does not have (pytorch/pytorch#61222); use "
            "student_grad_mode='eval' or sync_bn=False"
        )


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model)`` on ``device``; rank 0's weights and buffers are
    broadcast to all ranks here. Buffers (BatchNorm running stats) are re-broadcast from rank 0
    at every grad-enabled forward (DDP's default), so all ranks keep rank 0's.
    """
    ids = None
    if device.type == "cuda":
        ids = [torch.cuda.current_device() if device.index is None else device.index]
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Replace ``model``'s BatchNorm layers by ``SyncBatchNorm`` in place, put them back after.

    The replacements share the originals' parameters and buffers (what the optimiser and the
    checkpoint see), so the trained values are in the original layers on exit. ``model``
    itself must not be a BatchNorm layer.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            bn = isinstance(child, nn.modules.batchnorm._BatchNorm)
            if bn and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    logger.debug("sync_batchnorm: %d BatchNorm layer(s) synchronised", len(swapped))
    try:
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)


@contextlib.contextmanager
def data_parallel(
    model: nn.Module, device: torch.device, *, sync_bn: bool = False
) -> Iterator[nn.Module]:
    """The module a training step calls: ``model`` itself when not distributed, else its DDP
    wrapper (:func:`wrap_ddp`; with ``sync_bn`` over :func:`sync_batchnorm` layers).

    On exit DDP's gradient hooks are removed from ``model``'s parameters (so a later plain
    backward on it does not reach a stale reducer) and BatchNorm layers are put back.
    """
    if not current().is_distributed:
        yield model
        return
    with contextlib.ExitStack() as stack:
        if sync_bn:
            stack.enter_context(sync_batchnorm(model))
        ddp = wrap_ddp(model, device)
        try:
            yield ddp
        finally:
            remove_hooks = getattr(ddp, "_remove_autograd_hooks", None)
            if remove_hooks is not None:
                remove_hooks()
