"""The tables ``bench.step_cost`` prints (items 1, 2, 2b, 2c/2d, 3, 3b and 8), from its
timings (:func:`bench.step_cost.time_pair`) and memory (:func:`bench.step_cost.memory`)."""

from __future__ import annotations

from typing import Any

import torch

from bench import common
from bench.pairs import BN_OFF, METHOD_CFG
from kdiga.methods import get_method


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def verdict(value: float, target: float) -> str:
    return f"<= {target} {'yes' if value <= target else 'NO'}"


def bn_report(results: list[dict[str, Any]], key: str = "t") -> list[str]:
    """Table 2c: BatchNorm conversion off (nn.BatchNorm2d) vs on (IGABatchNorm2d), from the
    wall times (``key="t"``) or the process CPU times (``key="cpu"``, table 2d)."""
    ms = 1e3
    rows = []
    for r in results:
        t = {k: v.median for k, v in r[key].items()}
        if f"kdiga {BN_OFF}" not in t:
            continue
        off = t[f"kdiga {BN_OFF}"] / t[f"kdiga (authors) {BN_OFF}"]
        on = t["kdiga"] / t["kdiga (authors)"]
        rows.append(
            [
                r["pair"].name,
                f"{t[f'kdiga {BN_OFF}'] * ms:.1f}",
                f"{t['kdiga'] * ms:.1f}",
                t[f"kdiga {BN_OFF}"] / t["kdiga"],
                f"{t[f'(b) student {BN_OFF}'] * ms:.1f}",
                f"{t['(b) student'] * ms:.1f}",
                t[f"(b) student {BN_OFF}"] / t["(b) student"],
                off,
                on,
                verdict(on, 0.75),
            ]
        )
    if not rows:
        return []
    heads = ["pair", "KDIGA ms off", "on", "off/on", "(b) ms off", "on", "off/on"]
    heads += ["ours/authors off", "ours/authors on", "target (on)"]
    if key == "t":
        title = (
            "2c. BatchNorm double backward: the student's BatchNorm as nn.BatchNorm2d (PyTorch's "
            "generic double backward, 'off') against IGABatchNorm2d ('on'); the authors' "
            "formulation timed on the same student each way"
        )
    else:
        title = (
            "2d. Table 2c from the same calls' process CPU time (medians; not counting time "
            "spent waiting for a core on a shared machine)"
        )
        heads = [h.replace(" ms", " CPU ms") for h in heads]
    return [title, common.fmt_table(rows, heads), ""]


def authors_table(results: list[dict[str, Any]]) -> list[str]:
    """Table 1: our KDIGA step against the authors' formulation, and their losses."""
    ms = 1e3
    rows = []
    for r in results:
        t, a = r["t"], r["agree"]
        ratio = t["kdiga"].median / t["kdiga (authors)"].median
        rows.append(
            [
                r["pair"].name,
                f"{t['kdiga'].median * ms:.1f}",
                f"{t['kdiga (authors)'].median * ms:.1f}",
                ratio,
                verdict(ratio, 0.75),
                f"{a['ours']:.6g}",
                f"{a['authors']:.6g}",
                f"{a['rel']:.1e} {'ok' if a['rel'] <= 1e-4 else 'MISMATCH'}",
                f"{a['grad_rel']:.1e}",
            ]
        )
    return [
        "1. KDIGA step, ours vs the authors' formulation (2 student + 2 teacher forwards)",
        common.fmt_table(
            rows,
            [
                "pair",
                "ours ms",
                "authors ms",
                "ours/authors",
                "target",
                "loss ours",
                "loss authors",
                "rel diff (<=1e-4)",
                "grad rel diff",
            ],
        ),
        "",
    ]


def parts_table(results: list[dict[str, Any]]) -> list[str]:
    """Table 2: our KDIGA step against its necessary parts timed alone."""
    ms = 1e3
    rows = []
    for r in results:
        t = r["t"]
        parts = t["(a) teacher"].median + t["(b) student"].median
        ratio = t["kdiga"].median / parts
        rows.append(
            [
                r["pair"].name,
                f"{t['kdiga'].median * ms:.1f}",
                f"{t['(a) teacher'].median * ms:.1f}",
                f"{t['(b) student'].median * ms:.1f}",
                ratio,
                verdict(ratio, 1.1),
            ]
        )
    return [
        "2. KDIGA step vs its necessary parts timed alone: (a) teacher_signals, "
        "(b) student fwd + CE/KL + gs(create_graph) + backward + SGD step",
        common.fmt_table(rows, ["pair", "ours ms", "(a) ms", "(b) ms", "ours/(a+b)", "target"]),
        "",
    ]


def plain_convs_table(results: list[dict[str, Any]]) -> list[str]:
    """Table 2b: the KDIGA step with plain nn.Conv2d for GroupedConv2d (pairs that have
    grouped convolutions; none: no table)."""
    ms = 1e3
    rows = [
        [
            r["pair"].name,
            f"{r['t']['kdiga (plain convs)'].median * ms:.1f}",
            f"{r['t']['kdiga'].median * ms:.1f}",
            r["t"]["kdiga (plain convs)"].median / r["t"]["kdiga"].median,
        ]
        for r in results
        if "kdiga (plain convs)" in r["t"]
    ]
    if not rows:
        return []
    return [
        "2b. The same KDIGA step with the student's grouped convolutions as plain nn.Conv2d "
        "(PyTorch's double backward, one call per group) against GroupedConv2d (ours)",
        common.fmt_table(rows, ["pair", "nn.Conv2d ms", "GroupedConv2d ms", "nn/ours"]),
        "",
    ]


def ratios_table(results: list[dict[str, Any]]) -> list[str]:
    """Table 3: step-time ratios against KD and ARD, with the pair's MAC ratio."""
    ms = 1e3
    rows = []
    for r in results:
        t = {k: v.median for k, v in r["t"].items()}
        rows.append(
            [
                r["pair"].name,
                r["pair"].describe(),
                f"{r['macs']:.1f}x",
                r["pair"].batch,
                f"{t['kd'] * ms:.1f}",
                t["kdiga"] / t["kd"],
                t["ard"] / t["kd"],
                t["kdiga_ardc"] / t["kd"],
                t["kdiga"] / t["ard"],
            ]
        )
    return [
        "3. Step-time ratios (ARD / ARDC: PGD-10, eps 8/255, step 2/255)",
        common.fmt_table(
            rows,
            [
                "pair",
                "teacher -> student",
                "teacher/student MACs",
                "B",
                "KD ms",
                "KDIGA/KD",
                "ARD/KD",
                "KDIGA-ARDC/KD",
                "KDIGA/ARD",
            ],
        ),
        "",
    ]


def methods_table(results: list[dict[str, Any]]) -> list[str]:
    """Table 3b: every registered method's step against KD's."""
    ms = 1e3
    rows = [
        [
            r["pair"].name,
            get_method(m).label,
            f"{r['t'][m].median * ms:.1f}",
            r["t"][m].median / r["t"]["kd"].median,
        ]
        for r in results
        for m in METHOD_CFG
    ]
    return [
        "3b. Every registered method's step against KD's, timed in the same interleaved rounds "
        "(inner maximisations: PGD-10, eps 8/255, step 2/255)",
        common.fmt_table(rows, ["pair", "method", "step ms", "step / KD"]),
        "",
    ]


def memory_table(mem: dict[str, Any], dev: torch.device) -> list[str]:
    """Table 8: peak memory of a KDIGA step against a KD step (:func:`memory`)."""
    rows = []
    for name, m in mem.items():
        if dev.type == "cuda":
            kd, kdiga = m["kd"]["peak"], m["kdiga"]["peak"]
            rows.append([name, _mib(kd), _mib(kdiga), kdiga / kd])
        else:
            kd_d = m["kd"]["peak_rss"] - m["kd"]["rss_before"]
            ki_d = m["kdiga"]["peak_rss"] - m["kdiga"]["rss_before"]
            rows.append(
                [
                    name,
                    _mib(m["kd"]["peak_rss"]),
                    _mib(m["kdiga"]["peak_rss"]),
                    m["kdiga"]["peak_rss"] / m["kd"]["peak_rss"],
                    _mib(kd_d),
                    _mib(ki_d),
                    ki_d / kd_d if kd_d > 0 else float("nan"),
                ]
            )
    if dev.type == "cuda":
        what = "torch.cuda.max_memory_allocated over one step, above what was allocated before"
        heads = ["pair", "KD peak", "KDIGA peak", "KDIGA/KD"]
    else:
        what = (
            "CPU, one fresh process per cell. 'process' = peak RSS of the whole process during "
            "the step (high-water mark reset just before it); 'step' = that minus the RSS just "
            "before the step (the step's own peak, give or take memory the C allocator held)"
        )
        if not all(m[k].get("reset") for m in mem.values() for k in ("kd", "kdiga")):
            what += (
                ". WARNING: the high-water mark could not be reset here, so 'process' "
                "includes earlier peaks (e.g. at import) and 'step' may be masked by them"
            )
        heads = [
            "pair",
            "KD process",
            "KDIGA process",
            "KDIGA/KD (process)",
            "KD step",
            "KDIGA step",
            "KDIGA/KD (step)",
        ]
    return [f"8. Peak memory of one step: {what}", common.fmt_table(rows, heads), ""]


def raw_table(results: list[dict[str, Any]]) -> list[str]:
    """The raw medians of every candidate, with their spread."""
    ms = 1e3
    rows = [
        [r["pair"].name, name, f"{v.median * ms:.1f}", f"{v.spread:.2f}", len(v.times)]
        for r in results
        for name, v in r["t"].items()
    ]
    return [
        "Raw medians (spread = (max - min) / median over the repeats)",
        common.fmt_table(rows, ["pair", "candidate", "median ms", "spread", "n"]),
    ]


def report(results: list[dict[str, Any]], mem: dict[str, Any], dev: torch.device) -> str:
    """The printed tables."""
    out = authors_table(results) + parts_table(results) + plain_convs_table(results)
    out += bn_report(results)
    if dev.type == "cpu":
        out += bn_report(results, "cpu")
    out += ratios_table(results) + methods_table(results) + memory_table(mem, dev)
    return "\n".join(out + raw_table(results))
