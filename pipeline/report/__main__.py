"""``python -m pipeline.report``: the report stage (pipeline.report.stage)."""

from pipeline.forkserver import stage_main
from pipeline.report.stage import main

if __name__ == "__main__":
    raise SystemExit(stage_main("pipeline.report", main))
