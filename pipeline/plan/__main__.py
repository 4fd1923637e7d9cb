"""``python -m pipeline.plan``: see :mod:`pipeline.plan.cli`."""

from pipeline.plan.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
