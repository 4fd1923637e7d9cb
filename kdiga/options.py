"""The library's option lists, without torch.

The modules that use a list import it from here, and so does the params schema
(``pipeline/params.py``), which loads without torch: a Snakemake dry run, ``python -m
pipeline.dag`` and ``python -m pipeline.sync`` pay no torch import.
"""

from __future__ import annotations

#: the threat models of the attacks and the inner maximisations: L∞ and L2 balls in [0, 1]
#: pixel space (kdiga.attacks.pgd)
NORMS = ("linf", "l2")
