"""The report's numbers: grouped per teacher, each a mean with its 95% CI, and the paper's
claims as paired differences with a verdict, from per-sample outcomes made up here."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_study import TINY

from kdiga.attacks.sweep import per_sample_correct
from kdiga.stats import INTERVAL_RULE, NEEDS_SEEDS, ONE_SEED_RULE, VERDICT_RULE, seeds_needed
from pipeline import dag
from pipeline.params import model_ids, student_jobs, validate
from pipeline.stages import report

N = 200


def _study(seeds: list[int]):
    raw = copy.deepcopy(TINY)
    raw["seeds"] = seeds
    raw["teachers"]["trades"] = copy.deepcopy(raw["teachers"]["pgdat"])
    raw["teachers"]["trades"]["train"]["method"] = "trades"
    raw["distill"]["methods"] = ["st", "kd", "ard", "kdiga", "kdiga_ardc"]
    raw["attack"]["attacks"] = ["pgd"]
    return validate(raw)


def _eval(acc: list[float], seed: int) -> dict:
    """A sweep result whose clean and robust rows hold round(acc * N) correct images (nested:
    an image broken at a smaller radius is broken at every larger one), shuffled by seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(N, generator=g)
    rows = []
    for a in acc:
        row = torch.zeros(N, dtype=torch.bool)
        row[order[: round(a * N)]] = True
        rows.append(row)
    bits = ["".join("1" if v else "0" for v in r.tolist()) for r in rows]
    return {
        "n": N,
        "radii": [0.05, 0.1],
        "radius_labels": ["0.05", "0.1"],
        "clean": acc[0],
        "robust": acc[1:],
        "clean_correct": bits[0],
        "robust_correct": bits[1:],
        "suspect": False,
    }


#: robust accuracy at 0.1 per method: KD far below its teacher, KDIGA far above KD, KDIGA-ARDC
#: far BELOW ARD (a claim the data contradict)
ROBUST = {"teacher": 0.6, "st": 0.0, "kd": 0.1, "ard": 0.6, "kdiga": 0.5, "kdiga_ardc": 0.3}


def _numbers(
    params, extra: dict[str, list[int]] | None = None, robust: dict[str, float] = ROBUST
) -> report.Numbers:
    """The study's numbers, robust accuracy at 0.1 from ``robust``; ``extra``: per method,
    images more (or fewer) that each seed gets right there, to spread it over the seeds."""
    extra = extra or {}
    numbers = report.Numbers.__new__(report.Numbers)
    numbers.params, numbers.attacks = params, ["pgd"]
    numbers.evals = {}
    for mid in model_ids(params):
        if mid in params.teachers:
            key, seed = "teacher", 0
        else:
            job = next(j for j in student_jobs(params) if j.id == mid)
            key, seed = job.method, job.seed
        r = robust[key]
        more = extra.get(key, [0] * (seed + 1))[seed]
        # the same images for every seed of a model (the seed moves the number by 1 image)
        numbers.evals[(mid, "pgd")] = _eval([0.9, min(1, r + 0.1), r + (seed + more) / N], 0)
    numbers.correct = {k: per_sample_correct(e) for k, e in numbers.evals.items()}
    numbers.teachers = {
        t: {"arch": "small_cnn", "kind": "PGD-AT", "val_acc": 0.9} for t in params.teachers
    }
    numbers.radii, numbers.radius_labels = [0.05, 0.1], ["0.05", "0.1"]
    numbers.bounds = {}
    for sid, t in dag.bounds_pairs(params):
        job = next(j for j in student_jobs(params) if j.id == sid)
        teacher = t or job.teacher
        llm = {"kd": 0.5, "kdiga": 0.2}.get(job.method, 0.3) + 0.01 * job.seed
        numbers.bounds[(sid, teacher)] = {
            "n": N,
            "radii": [0.1],
            "radius_labels": ["0.1"],
            "llm": [llm],
            "ce": 0.4,
            "grad_gap_l2": 1.0,
        }
    return numbers


def test_rows_are_grouped_per_teacher_with_students_without_one_in_each():
    params = _study([0, 1])
    groups = report.cells(params)
    assert list(groups) == ["pgdat", "trades"]
    for teacher, cells in groups.items():
        assert cells[0].method is None and cells[0].teacher == teacher
        assert [c.method for c in cells[1:]] == ["st", "kd", "ard", "kdiga", "kdiga_ardc"]
        assert all(len(c.seeds) == 2 for c in cells[1:])
        assert {c.teacher for c in cells[2:]} == {teacher} and cells[1].teacher is None


@pytest.mark.parametrize(("seeds", "method"), [([0, 1, 2], "seeds+images"), ([0], "bootstrap")])
def test_every_accuracy_has_a_ci_over_seeds_or_images(seeds, method):
    params = _study(seeds)
    numbers = _numbers(params)
    table = report.accuracy_table(params, numbers, "pgdat", "pgd")
    kd_row = next(line for line in table.splitlines() if "-KD->" in line)
    # clean 90%, robust 20% then 10% (+ the seed's one image); the teacher's mean in brackets
    cells = [c.strip() for c in kd_row.split("|")[2:-1]]
    assert cells[0].startswith("90.0 [") and cells[0].endswith("] (90.0)")
    assert cells[2].endswith("(60.0)")
    kd = next(c for c in report.cells(params)["pgdat"] if c.method == "kd")
    est = report.estimate(numbers.accuracy(kd, "pgd", 1))
    assert est.method == method and est.lo < est.mean < est.hi
    if method == "bootstrap":  # 10% of 200 images: binomial half-width about 4.2 points
        assert 0.025 < est.hi - est.mean < 0.06


def _by_claim(rows: list[dict]) -> dict:
    return {(r["teacher"], r["claim"].split(" (")[0]): r for r in rows}


def _table_cells(table: str) -> tuple[list[str], list[list[str]]]:
    """A markdown table as its header and rows of stripped cells."""
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()]
    return lines[0], lines[2:]


def test_claims_are_paired_differences_with_a_verdict():
    params = _study([0, 1, 2])
    rows = report.claims(params, _numbers(params))
    got = _by_claim(rows)
    assert len(rows) == 2 * 4  # two teachers x (KD vs teacher, KDIGA vs KD, ARDC vs ARD, LLM)
    kd = got[("pgdat", "KD loses the teacher's robustness")]
    assert kd["difference"].mean == pytest.approx(-0.5 + 1 / N) and kd["verdict"] == "supported"
    assert kd["difference"].method == "seeds+images"
    assert got[("trades", "KDIGA is more robust than KD")]["verdict"] == "supported"
    ardc = got[("pgdat", "KDIGA-ARDC is more robust than ARD")]
    assert ardc["difference"].mean == pytest.approx(-0.3) and ardc["verdict"] == "not supported"
    assert ardc["seed_sd"] == pytest.approx(0, abs=1e-12) and ardc["seeds_needed"] == 2
    words = report.claims_in_words(rows)
    assert any(
        "KDIGA-ARDC is more robust than ARD" in w and "**not supported**" in w for w in words
    )
    header, cells = _table_cells(report.claims_table(rows))
    assert header == report.CLAIMS_HEADER
    assert cells[0][:3] == [
        "pgdat",
        "small_cnn",
        "KD loses the teacher's robustness (KD − teacher)",
    ]
    assert [c[-1] for c in cells] == [r["verdict"] for r in rows]


def test_one_seed_gives_no_verdict_on_a_claim():
    params = _study([0])
    rows = report.claims(params, _numbers(params))
    got = _by_claim(rows)
    kd = got[("pgdat", "KD loses the teacher's robustness")]
    assert kd["difference"].mean == pytest.approx(-0.5) and kd["difference"].lo < -0.4
    header, cells = _table_cells(report.claims_table(rows))
    verdicts = [c[header.index("Verdict")] for c in cells]
    assert len(verdicts) == 8 and set(verdicts) == {NEEDS_SEEDS}
    assert not {"supported", "not supported"} & set(verdicts)
    assert {c[header.index("Seed SD")] for c in cells} == {"—"}
    assert {c[header.index("Seeds for a verdict")] for c in cells} == {"—"}
    robust = [c for c in cells if c[3].startswith("robust accuracy")]
    assert robust and all(c[4].endswith("(images only, one seed)") for c in robust)
    llm = got[("pgdat", "KDIGA is more locally linear than KD")]  # one number per model
    assert llm["difference"].lo is None and llm["verdict"] == NEEDS_SEEDS
    for w in report.claims_in_words(rows):
        assert w.endswith(f"**{NEEDS_SEEDS}**.") and "seed SD" not in w, w
    note = report.uncertainty_note(params, N)
    assert "images only, one seed" in note and ONE_SEED_RULE in note and VERDICT_RULE in note


def test_an_inconclusive_claim_says_how_many_seeds_it_would_need():
    params = _study([0, 1, 2])
    # KDIGA-ARDC level with ARD but 8, 4 fewer and 2 more images right per seed:
    # per-seed differences +4, -2, +1 points, mean +1, seed SD exactly 3 points
    level = ROBUST | {"kdiga_ardc": ROBUST["ard"]}
    numbers = _numbers(params, {"kdiga_ardc": [8, -4, 2]}, level)
    rows = report.claims(params, numbers)
    row = _by_claim(rows)[("pgdat", "KDIGA-ARDC is more robust than ARD")]
    diff = row["difference"]
    assert diff.mean == pytest.approx(0.01) and row["seed_sd"] == pytest.approx(0.03)
    assert row["verdict"] == "inconclusive"
    need = seeds_needed(diff)
    assert row["seeds_needed"] == need and need > 3
    header, cells = _table_cells(report.claims_table([row]))
    cell = dict(zip(header, cells[0], strict=True))
    assert cell["Difference"] == diff.format(signed=True)  # over seeds and images: no label
    assert (cell["Seed SD"], cell["Seeds for a verdict"]) == ("3.0", str(need))
    (words,) = report.claims_in_words([row])
    tail = f"seed SD 3.0 points; **inconclusive**; a difference this size would need about {need}"
    assert words.endswith(f"{tail} seeds."), words
    metrics = report.metrics(params, numbers, rows)["claims"][row["key"]]
    assert metrics == {
        "difference": diff.mean,
        "lo": diff.lo,
        "hi": diff.hi,
        "seed_sd": row["seed_sd"],
        "seeds_needed": need,
        "verdict": "inconclusive",
    }
    note = report.uncertainty_note(params, N)
    assert "3 training seeds and the 200 test images" in note and INTERVAL_RULE in note


def test_metrics_leave_out_what_one_seed_cannot_give():
    params = _study([0])
    numbers = _numbers(params)
    rows = report.claims(params, numbers)
    claims = report.metrics(params, numbers, rows)["claims"]
    kd = claims["pgdat/small_cnn/kd-teacher/robust"]
    assert set(kd) == {"difference", "lo", "hi", "verdict"} and kd["verdict"] == NEEDS_SEEDS
    llm = claims["pgdat/small_cnn/kdiga-kd/llm"]  # no interval either
    assert set(llm) == {"difference", "verdict"}


def test_with_seeds_an_llm_claim_gets_an_interval_over_seeds():
    params = _study([0, 1, 2])
    rows = report.claims(params, _numbers(params))
    llm = next(r for r in rows if "locally linear" in r["claim"] and r["teacher"] == "pgdat")
    assert llm["difference"].method == "seeds"
    assert llm["difference"].mean == pytest.approx(-0.3) and llm["verdict"] == "supported"


def test_claims_need_their_methods():
    params = _study([0])
    raw = copy.deepcopy(params.raw)
    raw["distill"]["methods"] = ["st", "kd"]
    few = validate(raw)
    numbers = _numbers(few)
    assert {r["claim"].split(" (")[0] for r in report.claims(few, numbers)} == {
        "KD loses the teacher's robustness"
    }
