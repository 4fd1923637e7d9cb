"""``python -m pipeline.stages.report``: the report stage (pipeline.stages.report.stage)."""

from pipeline.forkserver import stage_main
from pipeline.stages.report.stage import main

if __name__ == "__main__":
    raise SystemExit(stage_main("pipeline.stages.report", main))
