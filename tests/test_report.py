"""The report's numbers: grouped per teacher, each a mean with its 95% CI, and the paper's
claims as paired differences with a verdict, from per-sample outcomes made up here."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_study import TINY

from kdiga.attacks.sweep import per_sample_correct
from pipeline import report
from pipeline.params import model_ids, student_jobs, validate

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


def _numbers(params) -> report.Numbers:
    numbers = report.Numbers.__new__(report.Numbers)
    numbers.params, numbers.attacks = params, ["pgd"]
    numbers.evals = {}
    for mid in model_ids(params):
        if mid in params.teachers:
            key, seed = "teacher", 0
        else:
            job = next(j for j in student_jobs(params) if j.id == mid)
            key, seed = job.method, job.seed
        r = ROBUST[key]
        # the same images for every seed of a model (the seed moves the number by 1 image)
        numbers.evals[(mid, "pgd")] = _eval([0.9, min(1, r + 0.1), r + seed / N], 0)
    numbers.correct = {k: per_sample_correct(e) for k, e in numbers.evals.items()}
    numbers.teachers = {t: {"arch": "small_cnn", "kind": "PGD-AT"} for t in params.teachers}
    numbers.radii, numbers.radius_labels = [0.05, 0.1], ["0.05", "0.1"]
    numbers.bounds = {}
    for sid, t in report.dag.bounds_pairs(params):
        job = next(j for j in student_jobs(params) if j.id == sid)
        teacher = t or job.teacher
        llm = {"kd": 0.5, "kdiga": 0.2}.get(job.method, 0.3) + 0.01 * job.seed
        numbers.bounds[(sid, teacher)] = {"n": N, "radii": [0.1], "radius_labels": ["0.1"],
                                          "llm": [llm], "ce": 0.4, "grad_gap_l2": 1.0}  # fmt: skip
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


@pytest.mark.parametrize(("seeds", "method"), [([0, 1, 2], "seeds"), ([0], "bootstrap")])
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
    est = report._estimate(numbers.accuracy(kd, "pgd", 1))
    assert est.method == method and est.lo < est.mean < est.hi
    if method == "bootstrap":  # 10% of 200 images: binomial half-width about 4.2 points
        assert 0.025 < est.hi - est.mean < 0.06


def test_claims_are_paired_differences_with_a_verdict():
    params = _study([0])
    rows = report.claims(params, _numbers(params))
    got = {(r["teacher"], r["claim"].split(" (")[0]): r for r in rows}
    assert len(rows) == 2 * 4  # two teachers x (KD vs teacher, KDIGA vs KD, ARDC vs ARD, LLM)
    kd = got[("pgdat", "KD loses the teacher's robustness")]
    assert kd["difference"].mean == pytest.approx(-0.5) and kd["verdict"] == "supported"
    assert got[("trades", "KDIGA is more robust than KD")]["verdict"] == "supported"
    ardc = got[("pgdat", "KDIGA-ARDC is more robust than ARD")]
    assert ardc["difference"].mean == pytest.approx(-0.3) and ardc["verdict"] == "not supported"
    llm = got[("pgdat", "KDIGA is more locally linear than KD")]
    assert llm["verdict"] == "inconclusive"  # one number per model: no interval
    words = report.claims_in_words(rows)
    assert any("KDIGA-ARDC is more robust than ARD" in w and "**not supported**" in w
               for w in words)  # fmt: skip
    assert "| pgdat | small_cnn | KD loses" in report.claims_table(rows)


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
