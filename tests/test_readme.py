"""The README's generated block: the report's opening, its claims, its figure and its sanity
checks, copied between the markers; the rest named, with a link to the report."""

from __future__ import annotations

from pipeline.readme import BEGIN, END, embed

REPORT = """# Report

Dataset: digits.

## What this study supports

| claim | verdict |
|---|---|
| KDIGA − KD | supported |

## Accuracy (%) under 20-step PGD

| Model | Clean |
|---|---|

## Training

![accuracy against radius](figure1.png)

## Sanity checks

Every evaluation passed its checks.
"""


def test_the_readme_shows_the_claims_the_figure_and_names_the_rest():
    readme = f"# kdiga\n\nintro\n\n{BEGIN}\nold numbers\n{END}\n\n## Using it\n"
    out = embed(readme, REPORT)
    block = out.split(BEGIN)[1].split(END)[0]
    assert "old numbers" not in out and out.endswith("\n\n## Using it\n")
    assert block.index("Dataset: digits.") < block.index("### What this study supports")
    assert "| KDIGA − KD | supported |" in block
    assert "![accuracy against radius](reports/figure1.png)" in block
    assert "### Sanity checks\n\nEvery evaluation passed its checks." in block
    assert "Clean |" not in block  # the accuracy tables stay in the report
    assert block.rstrip().endswith(
        "\n\nThe rest of the report, in [reports/report.md](reports/report.md): Accuracy (%) "
        "under 20-step PGD; Training."
    )
    assert embed(out, REPORT) == out  # the same README when nothing changed
