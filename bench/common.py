"""Timing, memory and size helpers shared by the benchmarks.

Every benchmark compares candidates measured side by side in one process: :func:`compare`
interleaves them (round robin, after a warm-up), so a slow-down of a shared machine hits all
candidates alike, and reports the median of the repeats. Times come from
``time.perf_counter``, with ``torch.cuda.synchronize()`` around each call on CUDA.

Memory: on CUDA, :func:`cuda_peak_bytes` is ``torch.cuda.max_memory_allocated`` over a call
minus what was allocated before it (tensors only; the caching allocator's reserve and the
CUDA context are not counted). On CPU, torch's allocator keeps no counter and does not go
through Python's allocator (so ``tracemalloc`` sees nothing); :func:`rss_peak_probe` reads the
process's resident-set high-water mark in a FRESH subprocess per measurement: the mark is
reset just before the step (``/proc/self/clear_refs``, Linux) and read after it (``VmHWM``;
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` where /proc is missing, which cannot be reset).
That number is the peak RSS of the whole process during the step (Python, torch's libraries,
the models, the batch and the step's own tensors); its excess over the RSS just before the
step is the step's own peak, give or take memory the C allocator already held (reused without
raising RSS) or kept after frees.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]


def device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if torch.cuda.is_available() and (dev is None or torch.device(dev).type == "cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (None: unchanged); restore the count afterwards."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(dev: torch.device | str) -> dict[str, Any]:
    """Date, CPU model, GPU name (None unless ``dev`` is CUDA), torch and python versions."""
    cuda = torch.device(dev).type == "cuda"
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def header() -> str:
    """Machine (CPU model, GPU name), torch version, threads and date, one line each."""
    m = machine(device())
    return "\n".join(
        [
            f"date:    {m['date']}",
            f"cpu:     {m['cpu']} ({os.cpu_count()} logical cores)",
            f"gpu:     {m['gpu'] or 'none (CPU run)'}",
            f"torch:   {m['torch']} (python {m['python']})",
            f"threads: {torch.get_num_threads()} intra-op",
        ]
    )


def progress(tag: str, msg: str) -> None:
    """A progress line on stderr, ``[tag] msg`` (stdout is for the tables)."""
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Timing:
    """Per-call wall times in seconds of one candidate."""

    name: str
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median, a rough noise indicator."""
        return (max(self.times) - min(self.times)) / self.median


def time_call(fn: Callable[[], Any], dev: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes (CUDA synchronised before and after)."""
    sync(dev)
    start = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - start


def compare(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    dev: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time candidates interleaved: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    Each round calls every candidate once, in a rotated order so none always runs first.
    Returns name -> :class:`Timing` (use ``.median``).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: Timing(name, []) for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].times.append(time_call(fns[name], dev))
    return out


def with_cpu_time(
    fns: dict[str, Callable[[], Any]], warmup: int
) -> tuple[dict[str, Callable[[], Any]], Callable[[], dict[str, Timing]]]:
    """The candidates wrapped to also record the process CPU time of each call, and a
    function returning those times (the ``warmup`` first calls dropped) as Timings.

    On a machine whose cores are shared with other work, wall times include waiting for a
    core; CPU time does not, so its ratios stay close to the quiet machine's wall-time ratios
    (on CPU; on CUDA it measures only the host side).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}

    def wrap(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            start = time.process_time()
            out = fn()
            times[name].append(time.process_time() - start)
            return out

        return call

    def timings() -> dict[str, Timing]:
        return {name: Timing(name, t[warmup:]) for name, t in times.items()}

    return {name: wrap(name, fn) for name, fn in fns.items()}, timings


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors allocated during ``fn()`` above what was allocated before (CUDA)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_bytes(fn: Callable[[], Any], dev: torch.device | str) -> int:
    """Peak bytes above those held before ``fn()``: CUDA's allocator counter
    (:func:`cuda_peak_bytes`); on the CPU the process's RSS high-water mark over the call, in
    this process (a rougher number than :func:`rss_peak_probes`: it includes what the C
    allocator keeps)."""
    if torch.device(dev).type == "cuda":
        return cuda_peak_bytes(fn)
    before = current_rss_bytes()
    reset_peak_rss()
    fn()
    return max(0, peak_rss_bytes() - before)


def _status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in KiB; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``), else 0 where /proc is missing."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0).

    Writes ``5`` to /proc/self/clear_refs; returns False where that is not possible (then
    :func:`peak_rss_bytes` includes every earlier peak of the process, e.g. at import).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """This process's peak RSS since start or the last :func:`reset_peak_rss`.

    ``VmHWM`` from /proc/self/status; elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
    (KiB on Linux, bytes on macOS), which cannot be reset.
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_peak_probes(
    module: str, specs: Sequence[dict[str, Any]], timeout: float = 600.0
) -> list[dict[str, Any]]:
    """Run ``python -m <module> --mem-probe '<spec json>'`` per spec, each in a fresh process.

    The processes run concurrently (each one's own high-water mark is unaffected by the
    others; only their speed is). Each probe (written by the benchmark) builds what it needs,
    records ``rss_before`` (RSS just before the step), resets the high-water mark
    (:func:`reset_peak_rss`), runs the step once and prints ``{"peak_rss": ..., "rss_before":
    ..., "reset": bool}`` as its last stdout line; the parsed dicts come back in spec order.
    A fresh process per measurement keeps one measurement's allocator state out of the next.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, "--mem-probe", json.dumps(spec)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    out = []
    for spec, proc in zip(specs, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {spec} failed:\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def count_macs(model: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward of ``model`` on ONE input of ``shape`` [C, H, W].

    Counts Conv2d (``out elements * in_channels / groups * kh * kw``) and Linear
    (``in * out`` per row) through forward hooks; BatchNorm, activations, pooling and adds are
    left out (they are a few percent at most in these networks).
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        total += out[0].numel() * mod.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        x = torch.zeros(1, *shape, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def fmt_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain markdown table; floats with 3 significant decimals."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])
