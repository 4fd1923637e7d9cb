"""``python -m pipeline.params``: check a params file, or list every key."""

from __future__ import annotations

import argparse
import sys

from pipeline.params.fields import ParamError
from pipeline.params.ids import student_ids
from pipeline.params.load import load_params
from pipeline.params.schema import describe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.params", description="Check a params file, or list every key."
    )
    ap.add_argument("path", nargs="?", default=None, help="default: $KDIGA_PARAMS or params.yaml")
    ap.add_argument("--describe", action="store_true", help="every key, its default and meaning")
    args = ap.parse_args(argv)
    if args.describe:
        rows = describe()
        width = max(len(k) for k, _, _ in rows)
        for k, default, doc in rows:
            print(f"{k:<{width}}  {default:<24} {doc}".rstrip())
        return 0
    try:
        p = load_params(args.path)
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"ok: {len(p.teachers)} teacher(s), {len(p.students)} student(s), "
        f"{len(p.distill.methods)} method(s), {len(p.seeds)} seed(s): "
        f"{len(student_ids(p))} distillation jobs"
    )
    for warning in p.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
