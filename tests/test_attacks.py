"""Tests for kdiga.attacks: PGD, the radius sweep, the AutoAttack adapter and the checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdiga.attacks import (
    SweepResult,
    autoattack,
    check_gradients,
    check_perturbation,
    check_sweep,
    perturbation_norm,
    pgd,
    project_delta,
    robust_sweep,
    step_delta,
)
from kdiga.attacks.sweep import per_sample_correct


def tiny_cnn(in_chans: int = 1, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A small CNN on [B, C, 8, 8] with BatchNorm (so eval and train mode differ)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(in_chans, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, num_classes),
    )
    with torch.no_grad():  # non-trivial running stats, so eval and train outputs differ
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def labelled(model: nn.Module, n: int, in_chans: int = 1, wrong: int = 0, seed: int = 1):
    """Images [n, C, 8, 8] in [0, 1] labelled by the model's prediction; ``wrong`` of them
    get a wrong label (so clean accuracy is (n - wrong) / n)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, in_chans, 8, 8, generator=g, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % 10
    return x, y


class Linear2(nn.Module):
    """Two-class linear model: logits [f, -f] with f(x) = w·x + b, on [B, 1, 8, 8]."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1) @ self.w + self.b
        return torch.stack([f, -f], dim=1)


class Rounded(nn.Module):
    """Gradient-masked model: the input goes through round(), so every input gradient is 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.round(x * 4).flatten(1) / 4)


# ----------------------------------------------------------------------------- PGD


@settings(max_examples=25, deadline=None)
@given(
    eps=st.floats(1e-3, 1.0),
    steps=st.integers(0, 4),
    norm=st.sampled_from(["linf", "Linf", "l2", "L2"]),
    restarts=st.integers(1, 2),
    random_start=st.booleans(),
    early_stop=st.booleans(),
    step_scale=st.sampled_from([None, 0.1, 3.0]),
)
def test_pgd_stays_in_ball_and_box(
    eps, steps, norm, restarts, random_start, early_stop, step_scale
):
    model = tiny_cnn()
    x, y = labelled(model, 6)
    x[0] = 0.0  # corners of the box
    x[1] = 1.0
    step_size = None if step_scale is None else step_scale * eps
    x_adv = pgd(
        model,
        x,
        y,
        eps=eps,
        steps=steps,
        step_size=step_size,
        norm=norm,
        restarts=restarts,
        random_start=random_start,
        early_stop=early_stop,
    )
    dist = perturbation_norm(x_adv - x, norm)
    assert x_adv.shape == x.shape
    assert (dist <= eps * (1 + 1e-5) + 1e-7).all(), dist.max().item()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert check_perturbation(x, x_adv, eps, norm, tol=1e-5) == []


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(1e-3, 1.0), scale=st.floats(1e-6, 1e3), seed=st.integers(0, 1000))
def test_step_has_size_alpha_in_its_norm(alpha, scale, seed):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) * scale
    zero = torch.zeros_like(grad)
    l2 = step_delta(zero, grad, alpha, "l2")
    assert torch.allclose(perturbation_norm(l2, "l2"), torch.full((4,), alpha, dtype=grad.dtype))
    assert torch.allclose(l2 / alpha, grad / perturbation_norm(grad, "l2").view(-1, 1, 1, 1))
    assert torch.equal(step_delta(zero, grad, alpha, "linf"), alpha * grad.sign())


@settings(max_examples=30, deadline=None)
@given(eps=st.floats(1e-3, 2.0), seed=st.integers(0, 1000), norm=st.sampled_from(["linf", "l2"]))
def test_projection_is_the_nearest_point_for_points_inside_the_box(eps, seed, norm):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((3, 1, 4, 4), 0.5, dtype=torch.float64)
    delta = (torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) - 0.5) * 0.9
    out = project_delta(x, delta, eps, norm)
    n = perturbation_norm(delta, norm)
    inside = n <= eps
    assert torch.allclose(out[inside], delta[inside])  # already feasible: unchanged
    if norm == "linf":
        assert torch.allclose(out, delta.clamp(-eps, eps))
    else:  # radial projection onto the 2-ball
        expected = delta * (eps / n).clamp(max=1).view(-1, 1, 1, 1)
        assert torch.allclose(out, expected)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("was_training", [True, False])
def test_pgd_eval_mode_during_attack_restored_after_no_param_grads(norm, was_training):
    model = tiny_cnn().train(was_training)
    x, y = labelled(model.eval(), 4)
    model.train(was_training)
    seen = []
    hook = model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    pgd(model, x, y, eps=0.1, steps=2, norm=norm, restarts=2)
    hook.remove()
    assert seen and not any(seen)
    assert all(m.training == was_training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def _linear_case(n: int = 64, seed: int = 0):
    """float64 two-class linear model, inputs in [0.3, 0.7], labels = its predictions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, generator=g, dtype=torch.float64)
    x = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    model = Linear2(w, b=-float((0.5 * w).sum()))
    with torch.no_grad():
        f = model(x)[:, 0]
    y = (f < 0).long()
    return model, x, y, f.abs()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_flips_exactly_the_points_within_the_analytic_margin(norm):
    # f(x + δ) over ‖δ‖∞ ≤ ε reaches f(x) ∓ ε‖w‖₁ (‖w‖₂ for L2): a point flips iff
    # ε > |f(x)| / ‖w‖_dual. No attack can flip a point beyond it; PGD must flip those within.
    model, x, y, margin = _linear_case()
    dual = model.w.detach().abs().sum() if norm == "linf" else model.w.detach().norm()
    threshold = margin / dual
    eps = threshold.median().item()
    w = model.w.detach()
    largest_step = eps if norm == "linf" else eps * (w.abs().max() / w.norm()).item()
    assert largest_step < 0.3  # the [0, 1] box never binds: the optimum is the analytic one
    clear = (threshold < 0.95 * eps) | (threshold > 1.05 * eps)
    assert clear.sum() > 40
    x_adv = pgd(model, x, y, eps=eps, steps=10, norm=norm, random_start=norm == "linf")
    with torch.no_grad():
        flipped = model(x_adv).argmax(1) != y
    assert torch.equal(flipped[clear], (threshold < eps)[clear])
    assert flipped.any() and not flipped.all()


def test_pgd_reduces_accuracy_of_a_non_robust_cnn():
    model = tiny_cnn()
    x, y = labelled(model, 32)
    x_adv = pgd(model, x, y, eps=0.1, steps=10)
    with torch.no_grad():
        acc_adv = (model(x_adv).argmax(1) == y).float().mean().item()
    assert acc_adv < 0.5  # clean accuracy is 1 by construction


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_restarts_never_worse_than_one_run(norm):
    model = tiny_cnn()
    x, y = labelled(model, 32)
    eps = 0.05 if norm == "linf" else 0.4
    one = pgd(model, x, y, eps=eps, steps=3, norm=norm, generator=torch.Generator().manual_seed(5))
    many = pgd(
        model,
        x,
        y,
        eps=eps,
        steps=3,
        norm=norm,
        restarts=4,
        generator=torch.Generator().manual_seed(5),
    )
    with torch.no_grad():
        lo, lm = model(one), model(many)
    mis_one, mis_many = lo.argmax(1) != y, lm.argmax(1) != y
    loss_one = F.cross_entropy(lo, y, reduction="none")
    loss_many = F.cross_entropy(lm, y, reduction="none")
    assert (mis_many | ~mis_one).all()  # every point broken by one run stays broken
    same = mis_one == mis_many
    assert (loss_many[same] >= loss_one[same] - 1e-6).all()
    assert 0 < mis_one.sum() < len(y)  # the case is not trivial
    assert (loss_many > loss_one + 1e-4).any() or mis_many.sum() > mis_one.sum()


def test_pgd_early_stop_freezes_misclassified_points_and_counts_gradients():
    model = tiny_cnn()
    x, y = labelled(model, 8, wrong=3)
    x_adv, stats = pgd(
        model, x, y, eps=0.1, steps=5, random_start=False, early_stop=True, return_stats=True
    )
    assert torch.equal(x_adv[:3], x[:3])  # misclassified from the start: never moved
    assert 5 + 3 <= stats["grad_evals"] <= 5 * 5 + 3
    _, full = pgd(model, x, y, eps=0.1, steps=5, restarts=2, return_stats=True)
    assert full["grad_evals"] == 2 * 5 * 8


def test_pgd_steps_zero_without_random_start_is_identity():
    model = tiny_cnn()
    x, y = labelled(model, 4)
    assert torch.equal(pgd(model, x, y, eps=0.1, steps=0, random_start=False), x)


def test_pgd_custom_loss_fn_is_maximised():
    # maximising the logit of class 0 moves every point towards class 0.
    model = tiny_cnn()
    x, y = labelled(model, 16)
    x_adv = pgd(model, x, y, eps=0.2, steps=10, loss_fn=lambda z, t: z[:, 0] - z.mean(1))
    with torch.no_grad():
        gain = (model(x_adv)[:, 0] - model(x)[:, 0]).min()
    assert gain > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "l3"}, "linf"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"eps": math.inf}, "eps"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"step_size": 0.0}, "step_size"),
        ({"loss_fn": lambda z, t: F.cross_entropy(z, t)}, "per-sample"),
    ],
)
def test_pgd_rejects_bad_input(kwargs, match):
    model = tiny_cnn()
    x, y = labelled(model, 4)
    args = {"eps": 0.1, "steps": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        pgd(model, x, y, **args)


def test_pgd_rejects_inputs_outside_unit_box():
    model = tiny_cnn()
    x, y = labelled(model, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 2 - 0.5, y, eps=0.1, steps=1)


# ----------------------------------------------------------------------------- sweep

RADII = [0.01, 0.03, 0.06, 0.1]


@pytest.fixture(scope="module")
def sweep_data():
    model = tiny_cnn(seed=2)
    x, y = labelled(model, 40, wrong=5, seed=4)
    return model, x, y


def test_sweep_robust_accuracy_never_above_clean_and_non_increasing(sweep_data):
    model, x, y = sweep_data
    res = robust_sweep(model, x, y, [0.1, 0.0, 0.03], steps=5, batch_size=16)
    assert res.radii == [0.0, 0.03, 0.1]  # sorted
    assert torch.equal(res.robust[0], res.clean_correct)  # radius 0 is clean
    assert res.clean_correct.sum() == 35
    assert not (res.robust & ~res.clean_correct).any()
    assert not (res.robust[1:] & ~res.robust[:-1]).any()
    acc = res.accuracy()
    robust = [acc["robust"][r] for r in res.radii]
    assert robust == sorted(robust, reverse=True) and robust[0] == acc["clean"] == 35 / 40
    assert robust[-1] < robust[1] < robust[0]  # the attack does something at each radius
    assert check_sweep(res) == []
    assert all(m <= r + 1e-6 for m, r in zip(res.max_perturbation, res.radii, strict=True))
    assert all(res.in_range)
    assert res.to_dict()["robust"] == robust


def test_sweep_reuse_spends_fewer_gradients_and_only_attacks_survivors(sweep_data):
    model, x, y = sweep_data
    kw = {"steps": 5, "batch_size": 16, "seed": 1}
    reuse = robust_sweep(model, x, y, RADII, reuse=True, **kw)
    indep = robust_sweep(model, x, y, RADII, reuse=False, **kw)
    assert reuse.grad_evals < indep.grad_evals
    assert reuse.grad_evals == sum(reuse.grad_evals_per_radius)
    for k in range(1, len(RADII)):
        survivors = int(reuse.robust[k - 1].sum())
        assert survivors <= reuse.grad_evals_per_radius[k] <= 5 * survivors
    assert indep.grad_evals_per_radius[-1] >= int(indep.clean_correct.sum())


def test_sweep_deterministic_attack_reuse_robust_set_within_independent(sweep_data):
    model, x, y = sweep_data
    model, x = tiny_cnn(seed=2).double(), x.double()  # exact per-sample arithmetic
    kw = {"steps": 4, "batch_size": 16, "random_start": False}
    reuse = robust_sweep(model, x, y, RADII, reuse=True, **kw)
    indep = robust_sweep(model, x, y, RADII, reuse=False, **kw)
    assert torch.equal(reuse.robust[0], indep.robust[0])
    assert not (reuse.robust & ~indep.robust).any()
    # with reuse the robust set is the running intersection of the independent ones
    expected = torch.cummin(indep.robust.int(), dim=0).values.bool()
    assert torch.equal(reuse.robust, expected)


def test_sweep_resumes_after_interruption_with_identical_results(sweep_data, tmp_path: Path):
    model, x, y = sweep_data
    kw = {"steps": 3, "batch_size": 8, "seed": 7, "norm": "l2"}
    radii = [0.1, 0.3, 0.6]
    reference = robust_sweep(model, x, y, radii, **kw)

    calls = {"n": 0}

    def count(module, inputs):
        calls["n"] += 1

    def fail_after(limit):
        def hook(module, inputs):
            calls["n"] += 1
            if calls["n"] > limit:
                raise RuntimeError("simulated crash")

        return hook

    h = model.register_forward_pre_hook(count)
    robust_sweep(model, x, y, radii, **kw)
    h.remove()
    full_calls, calls["n"] = calls["n"], 0

    state = tmp_path / "sweep.pt"
    h = model.register_forward_pre_hook(fail_after(full_calls * 6 // 10))
    with pytest.raises(RuntimeError, match="simulated crash"):
        robust_sweep(model, x, y, radii, state_path=state, **kw)
    h.remove()
    done = torch.load(state, weights_only=True)["batches_done"]
    assert 0 < done < 5

    calls["n"] = 0
    h = model.register_forward_pre_hook(count)
    resumed = robust_sweep(model, x, y, radii, state_path=state, **kw)
    h.remove()
    assert calls["n"] < full_calls * 0.9
    assert torch.equal(resumed.robust, reference.robust)
    assert torch.equal(resumed.clean_correct, reference.clean_correct)
    assert resumed.grad_evals_per_radius == reference.grad_evals_per_radius
    assert resumed.max_perturbation == reference.max_perturbation
    assert resumed.flags == reference.flags

    with pytest.raises(ValueError, match="other arguments"):
        robust_sweep(model, x, y, [0.1, 0.2], state_path=state, **kw)


@pytest.mark.parametrize("reuse", [True, False])
def test_sweep_dict_per_sample_outcome_reproduces_the_accuracies(sweep_data, reuse):
    model, x, y = sweep_data
    res = robust_sweep(model, x, y, [0.0, *RADII], steps=3, batch_size=16, reuse=reuse)
    d = json.loads(json.dumps(res.to_dict()))
    clean, robust = per_sample_correct(d)
    assert torch.equal(clean, res.clean_correct) and torch.equal(robust, res.robust)
    assert clean.shape == (40,) and robust.shape == (5, 40)
    assert d["clean_correct"] == "".join("1" if v else "0" for v in res.clean_correct.tolist())
    assert clean.sum().item() / d["n"] == d["clean"]
    assert [row.sum().item() / d["n"] for row in robust] == d["robust"]
    assert 0 < d["robust"][-1] < d["clean"] < 1  # neither all-0 nor all-1: the test bites


def test_sweep_dict_keeps_rows_that_are_not_nested():
    res = _fake_sweep([[1, 0, 0], [1, 1, 0]], [1, 1, 0])  # a point revived at the larger radius
    d = res.to_dict()
    assert d["robust_correct"] == ["100", "110"] and d["clean_correct"] == "110"
    clean, robust = per_sample_correct(d)
    assert torch.equal(robust, res.robust) and torch.equal(clean, res.clean_correct)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("robust_correct"), "re-run the attack stage"),
        (lambda d: d.update(clean_correct="11"), "n=3"),
        (lambda d: d.update(clean_correct="1x0"), "'0'/'1'"),
        (lambda d: d.update(clean_correct=[1, 1, 0]), "string"),
        (lambda d: d.update(robust_correct=["100"]), "one string per radius"),
        (lambda d: d["robust_correct"].__setitem__(1, "1100"), r"robust_correct\[1\]"),
    ],
)
def test_per_sample_correct_rejects_malformed_dicts(edit, match):
    d = _fake_sweep([[1, 0, 0], [1, 0, 0]], [1, 1, 0]).to_dict()
    edit(d)
    with pytest.raises(ValueError, match=match):
        per_sample_correct(d)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radii": [0.1, 0.1]}, "distinct"),
        ({"radii": []}, "non-empty"),
        ({"radii": [-0.1]}, "radius"),
        ({"radii": [math.nan]}, "radius"),
        ({"attack": "fgsm"}, "pgd"),
        ({"norm": "l7"}, "linf"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_sweep_rejects_bad_input(sweep_data, kwargs, match):
    model, x, y = sweep_data
    args = {"radii": [0.1]} | kwargs
    with pytest.raises(ValueError, match=match):
        robust_sweep(model, x[:4], y[:4], **args)


# ----------------------------------------------------------------------------- AutoAttack

CHEAP = {"version": "custom", "attacks": ["apgd-ce"], "n_iter": 10}


def test_autoattack_custom_list_within_eps_and_robust_within_clean():
    model = tiny_cnn(seed=5)
    x, y = labelled(model, 16, wrong=3)
    model.train()
    rng = torch.get_rng_state()
    res = autoattack(model, x, y, eps=0.05, batch_size=8, **CHEAP)
    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # pyautoattack's reseeding kept private
    assert res.attacks == ["apgd-ce"]
    assert check_perturbation(x, res.x_adv, 0.05, "linf") == []
    assert res.clean_correct.sum() == 13
    assert not (res.robust & ~res.clean_correct).any()
    assert res.robust.sum() < res.clean_correct.sum()  # APGD breaks some points
    with torch.no_grad():
        adv_pred = model.eval()(res.x_adv).argmax(1)
    assert torch.equal(res.robust, (adv_pred == y) & res.clean_correct)
    assert res.grad_evals > 0 and isinstance(res.flags, list)
    assert not any("zero" in f for f in res.flags)


def test_autoattack_flags_a_gradient_masked_model():
    model = Rounded()
    x, y = labelled(model, 8)
    res = autoattack(
        model, x, y, eps=0.03, version="custom", attacks=["apgd-dlr"], n_iter=5, batch_size=8
    )
    assert any("zero gradient" in f for f in res.flags), res.flags  # pyautoattack's check
    assert any("zero input gradient" in f for f in res.flags)  # ours, for the CE loss


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": "custom", "attacks": ["apgd-ce", "pgd"]}, "apgd-ce"),
        ({"attacks": ["apgd-ce"]}, "custom"),
        ({"version": "custom"}, "needs a list"),
        ({"version": "fast"}, "standard"),
        ({"norm": "L3"}, "Linf"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_autoattack_rejects_bad_input(kwargs, match):
    model = tiny_cnn()
    x, y = labelled(model, 2)
    args = {"eps": 0.03} | kwargs
    with pytest.raises(ValueError, match=match):
        autoattack(model, x, y, **args)


def test_sweep_with_autoattack(sweep_data):
    model, x, y = sweep_data
    x, y = x[:16], y[:16]
    res = robust_sweep(
        model, x, y, [0.02, 0.1], attack="autoattack", batch_size=16, autoattack_kwargs=CHEAP
    )
    assert check_sweep(res) == []
    assert not (res.robust[1] & ~res.robust[0]).any()
    assert res.robust[1].sum() < res.robust[0].sum() <= res.clean_correct.sum()
    assert res.grad_evals > 0


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize("norm", ["linf", "l2", "L1"])
def test_check_perturbation_finds_points_outside_ball_and_box(norm):
    x = torch.full((3, 1, 4, 4), 0.5)
    assert check_perturbation(x, x + 0.01 / 16, 0.01, norm) == []
    outside = x.clone()
    outside[1] += 0.2
    assert any("outside the" in p for p in check_perturbation(x, outside, 0.1, norm))
    box = x.clone()
    box[0, 0, 0, 0] = 1.5
    assert any("[0, 1]" in p for p in check_perturbation(x, box, 10.0, norm))


def _fake_sweep(robust: list[list[bool]], clean: list[bool]) -> SweepResult:
    r = len(robust)
    return SweepResult(
        radii=[0.1 * (k + 1) for k in range(r)],
        clean_correct=torch.tensor(clean),
        robust=torch.tensor(robust),
        grad_evals=0,
        grad_evals_per_radius=[0] * r,
        max_perturbation=[0.0] * r,
        in_range=[True] * r,
    )


def test_check_sweep_finds_robust_above_clean_and_rising():
    assert check_sweep(_fake_sweep([[1, 1, 0], [1, 0, 0]], [1, 1, 0])) == []
    above = check_sweep(_fake_sweep([[1, 1, 1], [1, 0, 0]], [1, 1, 0]))
    assert any("misclassified clean" in p for p in above)
    rising = check_sweep(_fake_sweep([[1, 0, 0], [1, 1, 0]], [1, 1, 0]))
    assert any("rises" in p for p in rising) and any("weak" in p for p in rising)


def test_check_gradients_flags_masked_but_not_plain_model():
    x = torch.rand(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    assert any("zero input gradient" in p for p in check_gradients(Rounded(), x, y))
    assert check_gradients(tiny_cnn(), x, y) == []


@pytest.mark.gpu
def test_attacks_on_cuda_match_the_cpu_contract():
    model = tiny_cnn()
    x, y = labelled(model, 16, wrong=2)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    x_adv = pgd(model, x, y, eps=0.05, steps=3, generator=torch.Generator().manual_seed(0))
    assert x_adv.is_cuda and check_perturbation(x.cpu(), x_adv.cpu(), 0.05, "linf") == []
    res = robust_sweep(model, x.cpu(), y.cpu(), [0.02, 0.05], steps=3, batch_size=8)
    assert check_sweep(res) == [] and not res.robust.is_cuda
    aa = autoattack(model, x, y, eps=0.05, batch_size=8, **CHEAP)
    assert check_perturbation(x.cpu(), aa.x_adv.cpu(), 0.05, "linf") == []
