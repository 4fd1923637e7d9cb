"""One prepared GPU check: ``python -m bench.gpu_check [--dry] [--out PATH] [--budget S]``.

Written to run in at most 8 minutes on one H100/H200 (``make gpu-check``) and to leave one
JSON file (default ``logs/gpu_check.json``, rewritten after every section) plus a one-screen
summary on stdout. Sections, in order; each runs inside its own try/except, so a failure is
recorded (with the end of its traceback) and the rest still run, and a section whose
estimate would overrun the global time budget (``--budget``, 420 s) is skipped and says so:

``gpu_tests``  every test marked ``gpu`` (``pytest -m gpu`` in a subprocess): pass/fail counts
    and the failures' names.
``step_cost``  KDIGA, KD and the authors' formulation (``bench.step_cost``) at real sizes:
    WRN-34-10 -> MobileNetV2 and ResNet-50 -> ResNet-18 shapes (the registry's names),
    CIFAR-10-shaped inputs [B, 3, 32, 32], 10 classes, B = 125, bf16 autocast; channels_last
    off and on, BatchNorm conversion (:class:`~kdiga.models.batchnorm.IGABatchNorm2d`) off
    and on; the 12 candidates of a pair interleaved (``bench.common.compare``).
``epoch``  a 50,000-image KDIGA epoch (``kdiga.train.fit``, WRN-34-10 -> MobileNetV2,
    crop+flip, bf16, channels_last) against its floor: the teacher's forward and input
    gradient at the measured bf16 matmul rate (FLOPs by ``torch.utils.flop_counter``'s
    formulas) plus the student's step at the measured copy bandwidth (memory-bound: twice
    the bytes of the new tensors its operators write, each written once and read at least
    once). The issue's estimate of that floor was about 3.1 s.
``memory``  peak memory of a KDIGA step against a KD step (``torch.cuda.max_memory_allocated``
    above what was allocated before), BatchNorm conversion off and on.
``pgd``  PGD-20 (L∞, ε = 8/255) images/s on the MobileNetV2 student in eval mode, eager and
    with ``pgd(..., compile_model=True)``: compile time against the time saved per
    10,000-image evaluation.
``compile_teacher``  ``teacher_signals`` of WRN-34-10 eager and through
    ``kdiga.train.maybe_compile_teacher`` (what ``TrainConfig(compile_teacher=True)`` does):
    compile time against the time saved per 50,000-image epoch, and the input gradients'
    difference.

``--dry`` runs the same code on the CPU at tiny sizes (narrow models, batches of 2-4, one
repeat, two PGD steps, only ``tests/test_layers.py``'s GPU tests, which skip there) in well
under a minute and writes a file of the same shape; ``tests/test_gpu_check.py`` runs it in CI.
On the CPU there is no autocast (as in ``fit``) and compilation is a no-op (see
:func:`kdiga.train.maybe_compile_teacher`), so dry runs time the eager path twice.

The sections and their sizes live in :mod:`bench.gpu_sections`; this module runs them within
the budget, keeps the record and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import common
from bench.gpu_sections import (
    Context,
    section_compile_teacher,
    section_epoch,
    section_gpu_tests,
    section_memory,
    section_pgd,
    section_step_cost,
    sizes,
)

FORMAT = "kdiga-gpu-check/1"
DEFAULT_OUT = common.REPO_ROOT / "logs" / "gpu_check.json"
#: seconds from the start within which every section must fit (8 minutes, less a margin)
DEFAULT_BUDGET_S = 420.0

#: name -> (function, one-line title); run in this order (correctness first)
SECTIONS: dict[str, tuple[Callable[[Context], dict[str, Any]], str]] = {
    "gpu_tests": (section_gpu_tests, "pytest -m gpu"),
    "step_cost": (section_step_cost, "KDIGA / KD / authors' step, channels_last x BN conversion"),
    "epoch": (section_epoch, "50k-image KDIGA epoch against its floor"),
    "memory": (section_memory, "peak memory, KDIGA vs KD"),
    "pgd": (section_pgd, "PGD images/s, eager vs compile_model=True"),
    "compile_teacher": (section_compile_teacher, "teacher signals, eager vs compile_teacher"),
}


def _failed(result: dict[str, Any]) -> bool:
    """A section that ran but found a problem (failing GPU tests)."""
    return bool(result.get("failed") or result.get("errors"))


def _record(
    status: str, seconds: float = 0.0, result: dict | None = None, error: str | None = None
) -> dict[str, Any]:
    """One section's entry in the results file."""
    return {"status": status, "seconds": seconds, "result": result, "error": error}


def run_section(ctx: Context, name: str) -> dict[str, Any]:
    """Run one section within the budget; its record: status ok / failed / error / skipped."""
    fn = SECTIONS[name][0]
    estimate = ctx.sizes.estimates[name]
    if estimate > ctx.left():
        left = max(0.0, ctx.left())
        return _record("skipped", error=f"needs about {estimate:.0f} s, {left:.0f} s left")
    t0 = time.perf_counter()
    try:
        result = fn(ctx)
    except Exception as exc:  # one section's failure must not stop the others
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
        return _record("error", time.perf_counter() - t0, None, error)
    finally:
        if ctx.dev.type == "cuda":
            torch.cuda.empty_cache()
    status = "failed" if _failed(result) else "ok"
    return _record(status, time.perf_counter() - t0, result)


def environment(dev: torch.device) -> dict[str, Any]:
    """The machine (:func:`bench.common.machine`), the device kind and CUDA's versions."""
    m = common.machine(dev)
    return {
        "date": m["date"],
        "device": dev.type,
        "gpu": m["gpu"],
        "cpu": m["cpu"],
        "torch": m["torch"],
        "python": m["python"],
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
    }


def check(
    *, dry: bool, budget_s: float, only: list[str] | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Run every section (or ``only`` those) and return the results record.

    With ``out`` the record is written there before and after every section (the running one
    marked ``"running"``), so a crash that takes the process down still leaves the results so
    far and the name of the section that was running.
    """
    dev = torch.device("cpu") if dry else common.device()
    ctx = Context(dev, sizes(dry), budget_s)
    record: dict[str, Any] = {
        "format": FORMAT,
        "mode": "dry" if dry else "full",
        "budget_s": budget_s,
        "elapsed_s": 0.0,
        "environment": environment(dev),
        "sections": {},
    }
    sections = record["sections"]
    with common.num_threads(1 if dev.type == "cpu" else None):
        for name in SECTIONS:
            if only is not None and name not in only:
                sections[name] = _record("skipped", error="not asked for (--only)")
                continue
            common.progress("gpu_check", f"{name} ({ctx.elapsed():.0f} s)")
            sections[name] = _record("running")
            if out is not None:
                write(record, out)
            sections[name] = run_section(ctx, name)
            record["elapsed_s"] = ctx.elapsed()
    if out is not None:
        write(record, out)
    return record


# --- the summary ----------------------------------------------------------------------------


def _si(v: float, unit: str) -> str:
    """``v`` with a decimal prefix: 1.23 T<unit>, 456 G<unit>, ..."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _ms(v: float) -> str:
    return f"{v * 1e3:.1f}"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:.0f} MiB"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _lines_step_cost(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            name,
            "on" if row["channels_last"] else "off",
            "on" if row["bn_conversion"] else "off",
            _ms(row["kd_s"]),
            _ms(row["kdiga_s"]),
            _ms(row["authors_s"]),
            row["kdiga_over_kd"],
            row["ours_over_authors"],
            f"{row['kdiga_images_per_s']:.0f}",
        ]
        for name, pair in r.items()
        for row in pair["rows"]
    ]
    heads = [
        "pair",
        "channels_last",
        "BN conv.",
        "KD ms",
        "KDIGA ms",
        "authors ms",
        "KDIGA/KD",
        "ours/authors",
        "KDIGA img/s",
    ]
    return [common.fmt_table(rows, heads)]


def _lines_epoch(r: dict[str, Any]) -> list[str]:
    return [
        f"{r['pair']}: {r['images']} images, B={r['batch']}: epoch {r['epoch_s']:.2f} s "
        f"({r['images_per_s']:.0f} img/s)",
        f"floor {r['floor_s']:.2f} s = teacher {r['floor_teacher_s']:.2f} s "
        f"({_si(r['teacher_flops_per_step'], 'FLOP')}/step at "
        f"{_si(r['matmul_flops_per_s'], 'FLOP/s')}) + student {r['floor_student_s']:.2f} s "
        f"({_si(2 * r['student_written_bytes_per_step'], 'B')}/step at "
        f"{_si(r['copy_bytes_per_s'], 'B/s')})",
        f"epoch/floor {r['epoch_over_floor']:.2f}; epoch/{r['issue_floor_s']} s (the issue's "
        f"estimate of the floor) {r['epoch_over_issue_floor']:.2f}",
    ]


def _lines_memory(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            name,
            "on" if row["bn_conversion"] else "off",
            _mib(row["kd_bytes"]),
            _mib(row["kdiga_bytes"]),
            _num(row["kdiga_over_kd"], ".2f"),
        ]
        for name, pair in r.items()
        if name != "how"
        for row in pair["rows"]
    ]
    return [r["how"], common.fmt_table(rows, ["pair", "BN conv.", "KD", "KDIGA", "KDIGA/KD"])]


def _lines_compiled(r: dict[str, Any]) -> list[str]:
    line = (
        f"{r['what']}: eager {_ms(r['eager_s'])} ms, compiled {_ms(r['compiled_s'])} ms "
        f"({r['speedup']:.2f}x); compile {r['compile_s']:.1f} s vs saving "
        f"{r['saving_per_unit_s']:.2f} s per {r['unit']} (break-even "
        f"{_num(r['break_even_units'], '.1f')})"
    )
    if not r.get("compiled"):
        line += "; not compiled (CPU: a no-op)"
    if "eager_images_per_s" in r:
        line += (
            f"; {r['eager_images_per_s']:.0f} -> {r['compiled_images_per_s']:.0f} img/s, "
            f"x_adv max |diff| {r['x_adv_max_abs_diff']:.2e}"
        )
    if "input_grad_max_rel_diff" in r:
        line += f"; input grad max rel diff {r['input_grad_max_rel_diff']:.2e}"
    return [line]


def _lines_gpu_tests(r: dict[str, Any]) -> list[str]:
    lines = [
        f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} "
        f"skipped (pytest exit {r['returncode']})"
    ]
    lines += r["failures"][:8]
    if r["tail"]:
        lines.append(r["tail"])
    return lines


_LINES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "step_cost": _lines_step_cost,
    "epoch": _lines_epoch,
    "memory": _lines_memory,
    "pgd": _lines_compiled,
    "compile_teacher": _lines_compiled,
    "gpu_tests": _lines_gpu_tests,
}


def summary(record: dict[str, Any]) -> str:
    """One screen: a header line, then per section its status, time and main numbers."""
    env, sections = record["environment"], record["sections"]
    statuses = [s["status"] for s in sections.values()]
    counts = ", ".join(f"{statuses.count(k)} {k}" for k in ("ok", "failed", "error", "skipped"))
    where = env["gpu"] or f"CPU ({env['cpu']})"
    out = [
        f"GPU check ({record['mode']}) on {where}, torch {env['torch']}: {counts}; "
        f"{record['elapsed_s']:.0f} s of a {record['budget_s']:.0f} s budget"
    ]
    for name, sec in sections.items():
        title = SECTIONS[name][1]
        out.append(f"\n== {name}: {sec['status']} ({sec['seconds']:.1f} s), {title}")
        if sec["result"] is not None:
            try:
                out += _LINES[name](sec["result"])
            except (KeyError, TypeError, ValueError) as exc:
                out.append(f"(cannot summarise: {type(exc).__name__}: {exc})")
        elif sec["error"]:
            out.append(sec["error"].strip().splitlines()[0])
    return "\n".join(out)


def _jsonable(obj: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) as None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(record), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the check, write the JSON, print the summary; exit status 0 unless the run broke."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds every section must fit in, from the start",
    )
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections")
    args = parser.parse_args(argv)
    record = check(dry=args.dry, budget_s=args.budget, only=args.only, out=args.out)
    print(summary(record))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
