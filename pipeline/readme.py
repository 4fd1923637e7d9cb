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


#: the report's sections the README shows (the rest: a link to the report)
SHOWN = ("What this study supports", "Sanity checks")


def summary(report: str) -> str:
    """The report's opening paragraphs, the sections in :data:`SHOWN` and its figure, then a
    line naming the sections left in ``reports/report.md``."""
    body = report.split("\n", 1)[1].lstrip("\n")  # drop the report's own title
    intro, *sections = re.split(r"^(?=## )", body, flags=re.M)
    kept, left = [intro], []
    for section in sections:
        title = section.split("\n", 1)[0].removeprefix("## ").strip()
        (kept if title in SHOWN else left).append(section)
    figure = re.search(r"^!\[[^\]]*\]\([^)]*\)$", body, flags=re.M)
    if figure:
        kept.insert(2, figure.group(0) + "\n\n")
    if left:
        titles = "; ".join(s.split("\n", 1)[0].removeprefix("## ").strip() for s in left)
        kept[-1] = kept[-1].rstrip("\n") + "\n\n"
        kept.append(f"The rest of the report, in [{dag.REPORT_MD}]({dag.REPORT_MD}): {titles}.\n")
    return "".join(kept)


def embed(readme: str, report: str) -> str:
    """README text with the block between the markers replaced by the report's
    :func:`summary`."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the {BEGIN} / {END} markers")
    body = re.sub(r"^## ", "### ", summary(report), flags=re.M)
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
