"""Run benchmarks and print their tables: ``python -m bench [names...] [--quick]``.

Each entry of :data:`BENCHMARKS` names a module with ``run(quick: bool) -> str`` (the text to
print). Modules are imported only when run; a module that does not exist yet is skipped with
a line saying so. Adding a benchmark is one line here.

Options the runner does not know go to the ``main(argv)`` of the one benchmark named:
``python -m bench llm_convergence --study .`` is ``python -m bench.llm_convergence --study .``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

from bench.common import header

BENCHMARKS: dict[str, str] = {
    "step_cost": "bench.step_cost",
    "sweep_reuse": "bench.sweep_reuse",
    "data_path": "bench.data_path",
    "pipeline_overhead": "bench.pipeline_overhead",
    "teacher_cache": "bench.teacher_cache",
    "llm_convergence": "bench.llm_convergence",
    "loader_throughput": "bench.loader_throughput",
}


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the named benchmarks (all by default); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    args, extra = parser.parse_known_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if extra:
        module = BENCHMARKS[args.names[0]] if len(args.names) == 1 else None
        if (
            module is None
            or not _find(module)
            or not hasattr(importlib.import_module(module), "main")
        ):
            parser.error(
                f"unrecognized arguments: {' '.join(extra)} (options of a benchmark's "
                "own go after exactly one name whose module has a main)"
            )
        importlib.import_module(module).main([*extra, *(["--quick"] if args.quick else [])])
        return 0

    print(header(), flush=True)
    for name in args.names or list(BENCHMARKS):
        module = BENCHMARKS[name]
        print(f"\n## {name}{' (quick)' if args.quick else ''}\n", flush=True)
        if not _find(module):
            print(f"skipped: module {module} does not exist (yet)", flush=True)
            continue
        start = time.perf_counter()
        text = importlib.import_module(module).run(args.quick)
        print(text)
        print(f"\n({name}: {time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
