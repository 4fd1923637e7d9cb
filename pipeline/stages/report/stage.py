"""The report stage's entry: read the study's numbers, write the report, its figure and CSV,
the metrics and the cost note."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdiga.files import atomic_write_text
from pipeline import dag, paths
from pipeline.params import Study, model_ids
from pipeline.provenance import seal
from pipeline.stages.common import begin, log, run, write_json
from pipeline.stages.report import sections
from pipeline.stages.report.claims import claims
from pipeline.stages.report.figure import figure, write_csv
from pipeline.stages.report.metrics import metrics, write_cost
from pipeline.stages.report.numbers import Numbers


def body(args: argparse.Namespace, params: Study) -> None:
    provenance = begin(params, "report")
    numbers = Numbers(params)
    Path(dag.REPORT_MD).parent.mkdir(parents=True, exist_ok=True)
    n_test = numbers.evals[(model_ids(params)[0], numbers.attacks[0])]["n"]
    parts = sections.opening(params, numbers, n_test)
    claim_rows = claims(params, numbers)
    parts += sections.claims_section(params, claim_rows)
    parts += sections.accuracy_section(params, numbers)
    parts += sections.bounds_section(params, numbers)
    parts += sections.prop2_section(params, numbers)
    parts += sections.training_section(params, numbers)
    parts += sections.sanity_section(numbers)
    atomic_write_text("\n".join(parts) + "\n", dag.REPORT_MD)
    table = figure(params, numbers, params.report.figure_attack, dag.REPORT_PNG)
    write_csv(table, dag.PLOT_CSV)
    write_json(metrics(params, numbers, claim_rows), dag.METRICS)
    write_json(
        seal(provenance, [dag.REPORT_MD, dag.REPORT_PNG, dag.METRICS, dag.PLOT_CSV]),
        dag.REPORT_RECORD,
    )
    write_cost(params)
    log.info(
        "wrote %s, %s, %s (wall-clock cost: %s)",
        dag.REPORT_MD,
        dag.REPORT_PNG,
        dag.METRICS,
        paths.COST_MD,
    )


def main(argv: list[str] | None = None) -> int:
    return run("report", "Write the report, plot and metrics.", body, argv)
