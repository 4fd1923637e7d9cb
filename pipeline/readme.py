"""Copy the study's report into README.md (between the report markers), so the README shows
what the pipeline measured, never numbers typed by hand. The figure stays where the report
stage wrote it (reports/, kept in git)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline import dag

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
FIGURE = Path(dag.REPORT_PNG)


def embed(readme: str, report: str) -> str:
    """README text with the block between the markers replaced by ``report``."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the {BEGIN} / {END} markers")
    body = report.split("\n", 1)[1].lstrip("\n")  # drop the report's own title
    body = re.sub(r"^## ", "### ", body, flags=re.M)
    body = body.replace(f"]({Path(dag.REPORT_PNG).name})", f"]({FIGURE.as_posix()})")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body.rstrip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    report = Path(dag.REPORT_MD)
    if not report.exists():
        print(f"error: {report} is missing: run the study first (make run)", file=sys.stderr)
        return 2
    readme = Path("README.md")
    readme.write_text(embed(readme.read_text(), report.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
