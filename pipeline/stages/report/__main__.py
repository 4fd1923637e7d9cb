"""``python -m pipeline.stages.report``: the report stage (pipeline.stages.report.stage) in
this process; ``python -m pipeline.stages report``, the study's command, may run it warm."""

from pipeline.stages.report.stage import main

if __name__ == "__main__":
    raise SystemExit(main())
