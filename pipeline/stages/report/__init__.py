"""Stage report: the paper's tables from what the pipeline measured, with their uncertainty,
a Figure-1-style plot with bands, the claims the study supports, and the metrics `dvc exp
show` reads.

- Tables 1-3 shape, one table per attack and teacher: clean and robust accuracy (%) per
  radius of the teacher and of every student distilled from it (and the students trained
  without a teacher), the teacher's own numbers in brackets.
- Table 4 shape, per teacher: LLM at each radius, clean CE and ||g_s - g_t||_2.
- Every number is a mean with its 95% CI (``kdiga.stats``): over the training seeds and the
  test images when the study has several seeds, else a bootstrap over the test images
  (images only, one seed).
- Claims: the paper's claims as paired differences (same images, same seeds) with their CI,
  the per-seed difference's spread across seeds, the seeds a verdict would take, and a
  verdict: supported, not supported, inconclusive at this size, or needs ≥ 2 seeds.
Nothing here is typed by hand: every number is read from the stages' outputs, and every
output is a function of them alone (the same inputs give the same bytes). Wall-clock cost
per method, relative to KD, goes to ``logs/cost.md`` beside the logs, outside what DVC hashes.

One topic a module: ``numbers`` (the stages' outputs read into rows), ``tables``, ``claims``,
``figure``, ``metrics`` (and the cost note), ``text`` (the notes in words), ``sections`` (the
report's markdown), ``stage`` (the stage's entry, run by ``python -m pipeline.stages report``).
"""

from pipeline.stages.report.claims import CLAIMS_HEADER, claims, claims_in_words, claims_table
from pipeline.stages.report.metrics import metrics
from pipeline.stages.report.numbers import Numbers, cells, estimate
from pipeline.stages.report.stage import main
from pipeline.stages.report.tables import accuracy_table, model_label, training_table
from pipeline.stages.report.text import uncertainty_note

__all__ = [
    "CLAIMS_HEADER",
    "Numbers",
    "accuracy_table",
    "cells",
    "claims",
    "claims_in_words",
    "claims_table",
    "estimate",
    "main",
    "metrics",
    "model_label",
    "training_table",
    "uncertainty_note",
]
