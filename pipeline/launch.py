"""Run one stage as a torchrun (DDP) job: on one node in held GPU slots, or over several nodes.

One node. With ``distill.gpus_per_job`` = N > 1, the distill job's own command (``python -m
pipeline.stages distill --model <id> --log <log>``, what Snakemake and DVC run) holds N GPUs of
the slot pool at once, all or none (:func:`pipeline.gpu.run_in_slots`), and runs the stage's
module with the same arguments under ``torch.distributed.run`` (torchrun) in them
(:func:`torchrun_command`)::

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        -m pipeline.stages.distill -- --model <id> --log logs/distill/<id>.log

The ``--`` keeps torchrun's own parser off the stage's arguments (it would take ``--log`` for
an abbreviation of its ``--log-dir``); the stage drops it. Each worker binds the device of its
``LOCAL_RANK`` among the N in ``CUDA_VISIBLE_DEVICES`` (:func:`kdiga.distributed.init_from_env`);
rank 0 writes the outputs and adds to the log, the others log to stderr only. ``--standalone``
holds the rendezvous on a free local port, so several such jobs share a machine. The workers
see ``WORLD_SIZE`` and never launch again. Without a GPU the stage trains in its own process,
on the CPU.

Several nodes. One student over M nodes of G GPUs each is a SLURM batch job of its own, not a
Snakemake job: set ``distill.gpus_per_job`` to M * G (the world size, which the model's
provenance records) and submit what ``python -m pipeline.launch <student id> --nnodes M``
prints (:func:`sbatch_script`). SLURM starts one task per node; each task's torchrun starts G
workers on its node and meets the other nodes at a c10d rendezvous (:func:`srun_command`)::

    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 \\
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:29500" --rdzv-id "$SLURM_JOB_ID" \\
        -m pipeline.stages.distill -- --model <id> --log logs/distill/<id>.log

``MASTER_ADDR`` is the allocation's first host, and the rendezvous port must be reachable from
every node; ``--rdzv-id`` (the SLURM job id) keeps concurrent jobs' rendezvous apart. The
repository and ``data/`` must be on a file system that every node shares (rank 0 writes the
checkpoint that every rank reads on resume). The job writes the files the DAG's distill job
writes, with the same provenance record, so the stages downstream accept them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from kdiga.errors import KdigaError
from pipeline import dag, gpu
from pipeline.params import ParamError, load_params, params_file, parse_student_id
from pipeline.stages.common import LOG_APPEND_ENV, log

TORCHRUN = ("-m", "torch.distributed.run")
RDZV_PORT = 29500  # torchrun's default master port


class LaunchError(KdigaError, RuntimeError):
    """A stage's torchrun job failed; its workers logged why."""


def under_torchrun() -> bool:
    """Whether this process is one worker of a torchrun (or srun-started) job."""
    return "WORLD_SIZE" in os.environ


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def torchrun_command(
    module: str, argv: Sequence[str], nproc: int, *, python: str | None = None
) -> list[str]:
    """The command that runs ``python -m <module> <argv>`` as ``nproc`` workers on this node.

    Args:
        module: the stage module (``"pipeline.stages.distill"``).
        argv: its arguments (``["--model", "<id>", "--log", "<log>"]``).
        nproc: workers, one per GPU.
        python: the interpreter (default: this one, ``sys.executable``).
    """
    _count("nproc", nproc)
    head = [python or sys.executable, *TORCHRUN, "--standalone", "--nproc-per-node", str(nproc)]
    return [*head, "-m", module, "--", *argv]


def srun_command(
    module: str,
    argv: Sequence[str],
    *,
    nnodes: int,
    nproc_per_node: int,
    port: int = RDZV_PORT,
    python: str = "python",
) -> str:
    """The shell line of a SLURM batch script that runs ``python -m <module> <argv>`` as
    ``nnodes * nproc_per_node`` workers: one torchrun per node, meeting at a c10d rendezvous
    on ``$MASTER_ADDR:port`` under the id ``$SLURM_JOB_ID`` (expanded by the script's shell).
    """
    _count("nnodes", nnodes)
    _count("nproc_per_node", nproc_per_node)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an int from 1 to 65535, got {port!r}")
    parts = ["srun", "--ntasks-per-node=1", shlex.quote(python), *TORCHRUN]
    parts += ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node)]
    parts += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f'"$MASTER_ADDR:{port}"']
    parts += ["--rdzv-id", '"$SLURM_JOB_ID"', "-m", shlex.quote(module), "--"]
    return " ".join([*parts, *map(shlex.quote, argv)])


def sbatch_script(
    model_id: str,
    *,
    nnodes: int,
    nproc_per_node: int,
    port: int = RDZV_PORT,
    python: str = "python",
    params: str | None = None,
) -> str:
    """A SLURM batch script that distills the student ``model_id`` over ``nnodes`` nodes of
    ``nproc_per_node`` GPUs each, writing what the DAG's distill job writes (``params``: the
    params file, else the workers' ``$KDIGA_PARAMS`` or params.yaml)."""
    argv = ["--model", model_id, "--log", dag.log_path("distill", model_id)]
    argv += ["--params", params] if params else []
    srun = srun_command(
        "pipeline.stages.distill",
        argv,
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        port=port,
        python=python,
    )
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name=distill-{model_id}",
            f"#SBATCH --nodes={nnodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={nproc_per_node}",
            "# add the partition, time limit, memory and account your cluster needs",
            "set -euo pipefail",
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            srun,
            "",
        ]
    )


def run_torchrun(module: str, argv: Sequence[str], nproc: int) -> bool:
    """Hold ``nproc`` GPUs (all or none) and run the stage as a torchrun job in them.

    Returns:
        True once the job has succeeded; False, with nothing run, when there is no GPU.

    Raises:
        LaunchError: the torchrun job exited with a non-zero status.
        GpuSlotsError: the machine's pool has fewer than ``nproc`` devices.
    """
    command = torchrun_command(module, argv, nproc)
    log.info("running %s as %d torchrun workers: %s", module, nproc, shlex.join(command))
    # The workers' rank 0 adds to the log this process started instead of truncating it.
    code = gpu.run_in_slots(command, nproc, extra_env={LOG_APPEND_ENV: "1"})
    if code is None:
        return False
    if code:
        raise LaunchError(
            f"the torchrun job `{shlex.join(command)}` exited with status {code} (its workers' "
            "errors are logged above)"
        )
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI: print the SLURM batch script that distills one student over several nodes."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.launch",
        description="Print a SLURM batch script that distills one student over several nodes "
        "(torchrun under srun, c10d rendezvous). distill.gpus_per_job is the total number of "
        "GPUs; each node runs gpus_per_job / nnodes of them.",
    )
    ap.add_argument("model", help="student id <teacher>--<method>--<student>--s<seed>")
    ap.add_argument("--nnodes", type=int, required=True, help="nodes of the job")
    ap.add_argument("--port", type=int, default=RDZV_PORT, help="rendezvous port on node 0")
    ap.add_argument("--params", default=None, help="params file (default: $KDIGA_PARAMS)")
    args = ap.parse_args(argv)
    if args.nnodes < 1:
        ap.error(f"--nnodes must be >= 1, got {args.nnodes}")
    try:
        params = load_params(args.params or params_file())
        parse_student_id(params, args.model)
        gpus = params.distill.gpus_per_job
        if gpus % args.nnodes:
            raise ParamError(
                "distill.gpus_per_job",
                gpus,
                f"it must be a multiple of --nnodes {args.nnodes} (each node runs "
                "gpus_per_job / nnodes workers)",
            )
        script = sbatch_script(
            args.model,
            nnodes=args.nnodes,
            nproc_per_node=gpus // args.nnodes,
            port=args.port,
            params=args.params,
        )
    except (ParamError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(script, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
