"""A cost plan before launch: ``python -m pipeline.plan [--params FILE] [--calibrate-steps K]
[--json]``.

One line per job of the study's DAG (:func:`pipeline.dag.jobs`, every stage) with its estimated
device-hours and peak memory, and their total. The hours come from a short calibration on
this machine's device: CUDA when there is one, else the CPU with ``$KDIGA_THREADS`` torch
threads, as the stages run (:func:`pipeline.stages.common.set_cpu_threads`); with one thread the
process's CPU time is timed, which leaves out the waits for a core of a shared machine.

- A training step (a distillation, a ``train`` teacher's PGD-AT or TRADES) is timed as the
  stages run it: ``kdiga.train.fit`` with the method's own loss (``kdiga.methods`` settings,
  ``kdiga.methods.build_loss``) on random images, the model built by ``kdiga.models.build_model``
  without pretrained weights (nothing is downloaded). One warm-up step, then K timed steps (at
  most one when a step exceeds :data:`~.calibrate.STEP_BUDGET_S`), at the params' batch, or
  at a smaller batch scaled linearly when a step at the full batch would exceed that budget
  (the plan says so). A method that takes the teacher only at the clean input is timed with
  given teacher signals and its teacher's forward (KD, ARD, RSLAD) or forward and input
  gradient (the IGA methods) added per image, unless ``signals.enabled`` serves it
  (bench/step_cost.py item 2: a KDIGA step costs its teacher part plus its student part).
- Per model, a forward and a forward + backward to the input, per image: evaluations, the
  attacks, the bounds, the signals, and teachers that are fetched (file, url, timm): those
  cost only their evaluation's forward passes.
- The shard stage: writing shards of random images, per image (reading the dataset is not
  counted). The report: a nominal minute.

Counts come from the params and the split sizes (the shard manifests when they match, else
``kdiga.options.DATASET_INFO``): steps per epoch = train images // batch, a validation pass
per epoch. Attacks and bounds are upper bounds: every point attacked at every radius for every
step, restart and AutoAttack attack (their sweeps skip points already broken). Each
calibration is measured once per (model, method and its settings, image size, batch, device)
and kept in memory.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed calls; on the CPU an
ESTIMATE from parameter sizes (with gradients and momentum when training) and the bytes
autograd saves for the backward (the activations), labelled so. Either is scaled linearly
from the timed batch, and a training job on in-memory data adds its training split, which
``fit`` holds on the device (a streamed dataset, ImageNet, holds only its batches).

The package: :mod:`~pipeline.plan.study` (split sizes, architectures),
:mod:`~pipeline.plan.calibrate` (the timings), :mod:`~pipeline.plan.estimate` (one row per
job), :mod:`~pipeline.plan.records` (the plan and its JSON), :mod:`~pipeline.plan.render`
(the table) and :mod:`~pipeline.plan.cli` (the command).
"""

from kdiga.lazy import lazy_exports
from pipeline.plan.records import Plan, Row
from pipeline.plan.render import render  # a name also of its module: bound here, not lazily

#: the names that need torch (the calibration, the estimates), imported on first use: the
#: package itself loads without torch, as ``pipeline.status`` reads a plan's records and table
_EXPORTS = {
    "Calibrator": "pipeline.plan.calibrate",
    "main": "pipeline.plan.cli",
    "autoattack_passes": "pipeline.plan.estimate",
    "make_plan": "pipeline.plan.estimate",
    "split_sizes": "pipeline.plan.study",
}

__all__ = [
    "Calibrator",
    "Plan",
    "Row",
    "autoattack_passes",
    "main",
    "make_plan",
    "render",
    "split_sizes",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
