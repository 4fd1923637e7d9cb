"""Tests for kdiga.bounds: local linearity (Definition 2), Proposition 2, Table 4."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kdiga.attacks
import kdiga.bounds
import kdiga.bounds.ascent
from kdiga.attacks import init_delta, project_delta, step_delta
from kdiga.bounds import (
    TABLE4_PARTS,
    VIOLATION_KINDS,
    AscentSettings,
    gap,
    input_gradient,
    llm_key,
    load_teacher_share,
    local_linearity,
    prop2_key,
    proposition2,
    proposition2_violations,
    residual,
    sample_indices,
    save_teacher_share,
    table4,
    teacher_share,
)
from kdiga.data import load_dataset, to_float

SHAPE = (1, 6, 6)
D = 36
# The study's settings before the adaptive ascent: a plain 10-step ascent from one random start.
PLAIN = dict(ascent="fixed", signs="abs", corners=False, patience=0)


def _mlp(seed: int, dtype=torch.float64, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, classes))
    return m.to(dtype)


def _conv(seed: int, dtype=torch.float64, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, classes))
    return m.to(dtype)


def _data(seed: int, n: int = 6, dtype=torch.float64, classes: int = 3, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand((n, *SHAPE), generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Constant(nn.Module):
    """Logits that ignore x: huge margin for class 0, so CE ~ 0 and its gradient is 0."""

    def forward(self, x):
        return (x.flatten(1)[:, :1] * 0 + torch.tensor([30.0, -30.0], dtype=x.dtype)).to(x.dtype)


class _Quadratic(nn.Module):
    """Logits [0, b + a·‖x − 0.5‖²]: CE = softplus(margin), gradient 0 at x = 0.5."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        m = self.b + self.a * ((x - 0.5) ** 2).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(m), m], dim=1)


# --------------------------------------------------------------------------- residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_is_exactly_zero_at_the_origin(dtype):
    model = _conv(1, dtype)
    x, y = _data(1, dtype=dtype)
    ce0, g0 = input_gradient(model, x, y)
    r = residual(model.eval(), x, y, torch.zeros_like(x), ce0, g0)
    assert torch.equal(r, torch.zeros_like(r))


def test_input_gradient_matches_per_sample_autograd():
    model = _mlp(2)
    x, y = _data(2, n=4)
    ce, g = input_gradient(model, x, y)
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        cei = F.cross_entropy(model(xi), y[i : i + 1])
        (gi,) = torch.autograd.grad(cei, xi)
        torch.testing.assert_close(ce[i], cei.detach())
        torch.testing.assert_close(g[i : i + 1], gi)


def test_residual_is_second_order_taylor_remainder():
    """r(te) − ½ t² eᵀHe = O(t³): halving t divides the error by ~8 (by ~2 if the gradient
    term were missing, by ~4 if the Hessian term did not match)."""
    model = _mlp(3)
    x, y = _data(3, n=2, lo=0.2, hi=0.8)
    ce0, g0 = input_gradient(model, x, y)
    d = torch.rand(x.shape, generator=_gen(3), dtype=x.dtype) * 2 - 1
    for i in range(len(x)):

        def f(v, i=i):
            return F.cross_entropy(model(v.view(1, *SHAPE)), y[i : i + 1])

        h = torch.autograd.functional.hessian(f, x[i].flatten())
        errs = []
        for t in (1e-2, 5e-3, 2.5e-3):
            e = t * d
            r = residual(model, x, y, e, ce0, g0)[i]
            q = 0.5 * e[i].flatten() @ h @ e[i].flatten()
            assert abs(q) > 1e-9
            assert abs(r - q) < 0.1 * abs(q)
            errs.append(abs(r - q).item())
        assert errs[1] / errs[0] < 0.2 and errs[2] / errs[1] < 0.2


# --------------------------------------------------------------------------- LLM


def test_llm_of_affine_logits_is_not_zero():
    """CE is nonlinear in the logits, so even an affine model has γ > 0."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 3)).double()
    x, y = _data(4)
    res = local_linearity(
        model, x, y, 0.1, settings=AscentSettings(steps=5, restarts=1), generator=_gen()
    )
    assert (res.gamma > 1e-4).all()


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.02, 0.1, 0.5]),
    norm=st.sampled_from(["linf", "l2"]),
    steps=st.integers(0, 4),
    restarts=st.integers(1, 3),
    ascent=st.sampled_from(["adaptive", "fixed"]),
    signs=st.sampled_from(["positive", "abs", "both"]),
)
def test_llm_is_max_over_every_point_evaluated(seed, eps, norm, steps, restarts, ascent, signs):
    model = _conv(seed)
    x, y = _data(seed)
    seen = []
    res = local_linearity(
        model,
        x,
        y,
        eps,
        settings=AscentSettings(
            steps=steps, restarts=restarts, norm=norm, ascent=ascent, signs=signs, patience=1
        ),
        generator=_gen(seed),
        on_evaluate=seen.append,
    )
    runs = restarts * (2 if signs == "both" else 1)
    assert res.evaluations == len(seen) <= runs * (steps + 1)
    assert (res.steps_used <= runs * steps).all()
    assert (res.gamma_half <= res.gamma).all()
    ce0, g0 = input_gradient(model, x, y)
    rs = torch.stack([residual(model, x, y, e, ce0, g0) for e in seen])
    torch.testing.assert_close(res.gamma, rs.abs().amax(0).clamp_min(0))
    assert (res.gamma >= 0).all()
    for e in [*seen, res.e_star]:  # every point inside the ball and the box
        norms = e.flatten(1).abs().amax(1) if norm == "linf" else e.flatten(1).norm(dim=1)
        assert (norms <= eps * (1 + 1e-9)).all()
        assert ((x + e) >= -1e-12).all() and ((x + e) <= 1 + 1e-12).all()
    r_star = residual(model, x, y, res.e_star, ce0, g0)
    torch.testing.assert_close(r_star, res.residual)
    torch.testing.assert_close(r_star.abs(), res.gamma)


def test_llm_keeps_the_absolute_value():
    """CE = softplus(−‖x − 0.5‖²) at x = 0.5 is concave in x with zero gradient: the residual
    is negative everywhere, largest in size at the corners of the L∞ ball. Ascent on |r| gets
    there; the authors' signed version would stay near e = 0."""
    model = _Quadratic(a=-1.0, b=0.0)
    x = torch.full((3, *SHAPE), 0.5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    eps = 0.1
    corner = F.softplus(torch.tensor(0.0)) - F.softplus(torch.tensor(-D * eps**2))
    # g = 0 at x, so the corners ±eps·sign(g) are e = 0 (where the gradient vanishes too):
    # the ascent needs a random start here.
    for signs in ("abs", "both"):
        res = local_linearity(
            model,
            x,
            y,
            eps,
            settings=AscentSettings(steps=5, restarts=1, corners=False, signs=signs),
            generator=_gen(),
        )
        assert (res.residual < 0).all()
        torch.testing.assert_close(res.gamma, corner.double().expand(3))


def test_llm_with_the_smaller_ball_optimum_is_monotone_in_eps():
    """The true LLM grows with eps; the ascent alone need not, but offering it the arg-max of
    the smaller ball (a point of the larger one) makes γ(eps2) >= γ(eps1) guaranteed."""
    model = _mlp(5)
    x, y = _data(5)
    small = local_linearity(model, x, y, 0.05, settings=AscentSettings(steps=4), generator=_gen(1))
    big = local_linearity(
        model,
        x,
        y,
        0.1,
        settings=AscentSettings(steps=4),
        generator=_gen(2),
        extra_perturbations=[small.e_star],
    )
    assert (big.gamma >= small.gamma).all()


def test_llm_covers_supplied_random_candidates():
    model = _conv(6)
    x, y = _data(6)
    eps = 0.1
    cands = [((torch.rand(x.shape, dtype=x.dtype) * 2 - 1) * eps + x).clamp(0, 1) - x]
    cands += [((torch.rand(x.shape, dtype=x.dtype) * 2 - 1) * eps + x).clamp(0, 1) - x]
    ce0, g0 = input_gradient(model, x, y)
    best = torch.stack([residual(model, x, y, e, ce0, g0).abs() for e in cands]).amax(0)
    res = local_linearity(
        model, x, y, eps, settings=AscentSettings(steps=2, restarts=1), extra_perturbations=cands
    )
    assert (res.gamma >= best).all()


def test_ascent_beats_random_sampling_on_average():
    """Same number of evaluations: 10 ascent steps from one start vs 11 random points."""
    model = _mlp(7, torch.float32)
    x, y = _data(7, n=32, dtype=torch.float32)
    asc = local_linearity(
        model, x, y, 0.1, settings=AscentSettings(steps=10, restarts=1, **PLAIN), generator=_gen()
    )
    rnd = local_linearity(
        model, x, y, 0.1, settings=AscentSettings(steps=0, restarts=11, **PLAIN), generator=_gen()
    )
    assert asc.evaluations == rnd.evaluations == 11
    assert asc.gamma.mean() > 1.5 * rnd.gamma.mean()


def test_a_warm_start_alone_is_the_run_from_that_point():
    """restarts=0 runs only the warm starts: from the FGSM corner it is the corner's run."""
    model = _mlp(3)
    x, y = _data(3, n=8)
    own = local_linearity(
        model, x, y, 0.1, settings=AscentSettings(steps=4, restarts=1), generator=_gen()
    )
    _, g = kdiga.bounds.input_gradient(model, x, y)
    corner = project_delta(x, 0.1 * g.sign(), 0.1, "linf")
    warm = local_linearity(
        model, x, y, 0.1, settings=AscentSettings(steps=4, restarts=0), warm_starts=[corner]
    )
    torch.testing.assert_close(warm.gamma, own.gamma, rtol=0, atol=0)
    assert warm.evaluations == own.evaluations
    with pytest.raises(ValueError, match="restarts=0 needs warm_starts"):
        local_linearity(model, x, y, 0.1, settings=AscentSettings(steps=4, restarts=0))


# --------------------------------------------------------------------------- Proposition 2


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.03, 0.2, 1.0]),
    norm=st.sampled_from(["linf", "l2"]),
    archs=st.sampled_from([(_mlp, _conv), (_conv, _mlp), (_mlp, _mlp)]),
)
def test_proposition2_holds_on_every_perturbation_tried(seed, eps, norm, archs):
    student, teacher = archs[0](seed), archs[1](seed + 1)
    x, y = _data(seed, n=5)
    gen = _gen(seed)
    extras = []
    for _ in range(20):
        if norm == "linf":
            e = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps
        else:
            e = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            e = e / e.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            e = e * eps * torch.rand(len(x), 1, 1, 1, generator=gen, dtype=x.dtype)
        extras.append((x + e).clamp(0, 1) - x)
    seen = []
    res = proposition2(
        student,
        teacher,
        x,
        y,
        eps,
        settings=AscentSettings(steps=4, restarts=2, norm=norm),
        generator=gen,
        extra_perturbations=extras,
        on_evaluate=seen.append,
    )
    assert len(seen) == res.evaluations <= 2 * 2 * 5 + 20
    gaps = torch.stack([gap(student, teacher, x, y, e) for e in [torch.zeros_like(x), *seen]])
    assert (gaps <= res.bound + 1e-6).all()
    torch.testing.assert_close(res.gap_max, gaps.amax(0))
    torch.testing.assert_close(res.bound, res.gamma_s + res.gamma_t + res.phi)
    dual = (res.grad_gap_dual - res.grad_gap_l2).abs()
    assert (dual < 1e-12).all() if norm == "l2" else (res.grad_gap_dual >= res.grad_gap_l2).all()


def _linear_student(seed: int, margin: float) -> tuple[nn.Module, torch.Tensor]:
    """Two classes, margin wᵀx + b ≈ `margin` >> 0 with y = 0: CE ≈ margin, linear in x."""
    torch.manual_seed(seed)
    lin = nn.Linear(D, 2).double()
    w = torch.randn(D, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1] = w
        lin.bias.copy_(torch.tensor([0.0, margin - 0.5 * w.sum().item()]))
    return nn.Sequential(nn.Flatten(), lin), w


def test_l2_norm_of_the_gradient_gap_is_not_enough_under_linf():
    """CE_s exactly linear up to 1e-17 (γs ≈ 0), teacher CE ≈ 0 with zero gradient: at
    e = eps·sign(w) the gap is ce_s + eps·‖w‖₁, which the dual (L1) φ covers and the L2 φ of
    the paper's "a norm" reading misses by eps·(‖w‖₁ − ‖w‖₂)."""
    student, w = _linear_student(8, margin=40.0)
    teacher = _Constant()
    x, _ = _data(8, lo=0.3, hi=0.7)
    y = torch.zeros(len(x), dtype=torch.long)
    eps = 0.1
    e = (eps * w.sign()).view(1, *SHAPE).expand_as(x).clone()
    res = proposition2(
        student,
        teacher,
        x,
        y,
        eps,
        settings=AscentSettings(steps=2, restarts=1),
        extra_perturbations=[e],
    )
    observed = gap(student, teacher, x, y, e)
    assert (res.gamma_s < 1e-12).all() and (res.gamma_t < 1e-12).all()
    assert (observed <= res.bound + 1e-9).all()
    wrong = res.gamma_s + res.gamma_t + res.ce_s + res.ce_t + eps * res.grad_gap_l2
    assert (observed > wrong + 1.0).all()


def test_dropping_the_student_llm_breaks_the_bound():
    """Student CE = softplus(‖x − 0.5‖²) at x = 0.5: zero gradient, so only γs accounts for
    the rise of the loss inside the ball."""
    student, teacher = _Quadratic(a=1.0, b=0.0), _Constant()
    x = torch.full((3, *SHAPE), 0.5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    eps = 0.1
    e = torch.full_like(x, eps)
    res = proposition2(
        student,
        teacher,
        x,
        y,
        eps,
        settings=AscentSettings(steps=2, restarts=1),
        extra_perturbations=[e],
    )
    observed = gap(student, teacher, x, y, e)
    assert (observed <= res.bound + 1e-9).all()
    assert (observed > res.gamma_t + res.phi + 0.1).all()


def test_extra_perturbation_outside_the_ball_is_rejected():
    model = _mlp(9)
    x, y = _data(9, lo=0.3, hi=0.7)
    e = torch.full_like(x, 0.11)
    with pytest.raises(ValueError, match="ball"):
        proposition2(
            model,
            model,
            x,
            y,
            0.1,
            settings=AscentSettings(steps=1, restarts=1),
            extra_perturbations=[e],
        )
    with pytest.raises(ValueError, match="ball"):
        local_linearity(model, x, y, 0.1, settings=AscentSettings(steps=1), extra_perturbations=[e])
    x1 = torch.ones_like(x)
    with pytest.raises(ValueError, match="box"):
        local_linearity(
            model, x1, y, 0.2, settings=AscentSettings(steps=1), extra_perturbations=[e]
        )


# --------------------------------------------------------------------------- Table 4


def test_table4_keys_values_and_determinism():
    student, teacher = _conv(10, torch.float32), _mlp(11, torch.float32)
    x, y = _data(10, n=7, dtype=torch.float32)
    kw = dict(radii=(4 / 255, 8 / 255), settings=AscentSettings(steps=3, restarts=1), batch_size=3)
    a = table4(student, teacher, x, y, generator=_gen(5), **kw)
    b = table4(student, teacher, x, y, generator=_gen(5), **kw)
    means = {llm_key(4 / 255), llm_key(8 / 255), "ce", "grad_gap_l2"}
    parts = {llm_key(r, p) for r in (4 / 255, 8 / 255) for p in TABLE4_PARTS}
    assert set(a) == means | parts | {"ce/samples", "grad_gap_l2/samples"}
    assert llm_key(8 / 255) == "llm@0.0313725"
    assert llm_key(8 / 255, "samples") == "llm@0.0313725/samples"
    assert a == b
    for key, v in a.items():
        values = v if isinstance(v, list) else [v]
        kind = {"samples_converged": bool, "samples_steps": int}.get(key.rsplit("/")[-1], float)
        assert all(type(u) is kind and math.isfinite(u) and u >= 0 for u in values), key
    assert a[llm_key(8 / 255)] > 0
    assert all(len(v) == len(x) for v in a.values() if isinstance(v, list))
    for r in (4 / 255, 8 / 255):  # the per-sample record agrees with its summary
        steps, converged = a[llm_key(r, "samples_steps")], a[llm_key(r, "samples_converged")]
        assert sum(steps) / len(x) == pytest.approx(a[llm_key(r, "steps")], rel=1e-12)
        assert sum(converged) / len(x) == pytest.approx(a[llm_key(r, "converged")], rel=1e-12)
        assert all(0 < k <= 3 for k in steps)  # restarts=1, steps=3


def test_table4_means_match_the_per_sample_functions():
    student, teacher = _mlp(12), _conv(13)
    x, y = _data(12, n=5)
    t4 = table4(
        student,
        teacher,
        x,
        y,
        settings=AscentSettings(steps=2, restarts=1),
        radii=(0.05, 0.1),
        batch_size=2,
        generator=_gen(7),
    )
    big = table4(
        student,
        teacher,
        x,
        y,
        settings=AscentSettings(steps=2, restarts=1),
        radii=(0.05, 0.1),
        batch_size=10,
        generator=_gen(7),
    )
    ce_s, g_s = input_gradient(student, x, y)
    _, g_t = input_gradient(teacher, x, y)
    assert t4["ce"] == pytest.approx(ce_s.mean().item(), rel=1e-12)
    assert t4["grad_gap_l2"] == pytest.approx((g_s - g_t).flatten(1).norm(dim=1).mean().item())
    assert big["ce"] == pytest.approx(t4["ce"]) and big["grad_gap_l2"] == pytest.approx(
        t4["grad_gap_l2"]
    )
    gen = _gen(7)  # one batch draws the same random starts in the same order
    for r in (0.05, 0.1):
        llm = local_linearity(
            student, x, y, r, settings=AscentSettings(steps=2, restarts=1), generator=gen
        )
        assert big[llm_key(r)] == pytest.approx(llm.gamma.mean().item(), rel=1e-12)


def test_sample_indices():
    a = sample_indices(100, 10, seed=3)
    assert a.dtype == torch.int64 and len(a) == 10 and len(set(a.tolist())) == 10
    assert torch.equal(a, a.sort().values) and a.min() >= 0 and a.max() < 100
    assert torch.equal(a, sample_indices(100, 10, seed=3))
    assert not torch.equal(a, sample_indices(100, 10, seed=4))
    with pytest.raises(ValueError, match="n_total"):
        sample_indices(5, 6, seed=0)


# --------------------------------------------------------------------------- modes, grads


def _stochastic_model() -> nn.Module:
    torch.manual_seed(14)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()


CALLS = {
    "input_gradient": lambda s, t, x, y: input_gradient(s, x, y),
    "local_linearity": lambda s, t, x, y: local_linearity(
        s, x, y, 0.1, settings=AscentSettings(steps=2, restarts=1)
    ),
    "proposition2": lambda s, t, x, y: proposition2(
        s, t, x, y, 0.1, settings=AscentSettings(steps=2, restarts=1)
    ),
    "gap": lambda s, t, x, y: gap(s, t, x, y, torch.full_like(x, 0.01)),
    "table4": lambda s, t, x, y: table4(
        s, t, x, y, settings=AscentSettings(steps=2, restarts=1), radii=(0.1,)
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_modes_restored_no_param_grads_eval_mode_used(name):
    student, teacher = _stochastic_model(), _stochastic_model()
    teacher.eval()
    teacher[0].weight.requires_grad_(False)
    x, y = _data(14, n=4)
    stats = student[1].running_mean.clone()
    flags = [p.requires_grad for m in (student, teacher) for p in m.parameters()]
    first = CALLS[name](student, teacher, x, y)
    assert student.training and all(m.training for m in student.modules())
    assert not any(m.training for m in teacher.modules())
    assert flags == [p.requires_grad for m in (student, teacher) for p in m.parameters()]
    assert all(p.grad is None for m in (student, teacher) for p in m.parameters())
    assert torch.equal(student[1].running_mean, stats)  # BatchNorm never in train mode
    if name in ("input_gradient", "gap"):  # no randomness: dropout in train mode would show
        second = CALLS[name](student, teacher, x, y)
        for u, v in zip(torch.atleast_1d(first), torch.atleast_1d(second), strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(ctx):
    student, teacher = _mlp(15), _conv(15)
    x, y = _data(15)
    ref = proposition2(
        student, teacher, x, y, 0.1, settings=AscentSettings(steps=2), generator=_gen()
    )
    with ctx():
        x, y = x.clone(), y.clone()  # inference tensors under inference_mode
        res = proposition2(
            student, teacher, x, y, 0.1, settings=AscentSettings(steps=2), generator=_gen()
        )
        t4 = table4(
            student, teacher, x, y, settings=AscentSettings(steps=1, restarts=1), radii=(0.1,)
        )
    assert torch.equal(ref.bound, res.bound)
    assert math.isfinite(t4["llm@0.1"])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"steps": -1}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"step_size": 0.0}, "step_size"),
        ({"norm": "l1"}, "linf"),
        ({"ascent": "apgd"}, "ascent"),
        ({"signs": "negative"}, "signs"),
        ({"corners": 1}, "corners"),
        ({"tol": -0.1}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"patience": -1}, "patience"),
        ({"patience": 1.5}, "patience"),
    ],
)
@pytest.mark.parametrize("fn", ["local_linearity", "proposition2", "proposition2_violations"])
def test_bad_arguments_raise_value_error(kwargs, match, fn):
    model = _mlp(16)
    x, y = _data(16, n=2)
    args = {"eps": 0.1, "steps": 1, "restarts": 1, **kwargs}
    eps = args.pop("eps")
    with pytest.raises(ValueError, match=match):
        settings = AscentSettings(**args)
        if fn == "local_linearity":
            local_linearity(model, x, y, eps, settings=settings)
        elif fn == "proposition2":
            proposition2(model, model, x, y, eps, settings=settings)
        else:
            proposition2_violations(model, model, x, y, eps, settings=settings)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pgd_steps": -1}, "pgd_steps"),
        ({"random_points": -2}, "random_points"),
        ({"rtol": -1e-3}, "rtol"),
        ({"x_adv_student": "x+0.2"}, "ball"),
    ],
)
def test_bad_violation_arguments_raise_value_error(kwargs, match):
    model = _mlp(16)
    x, y = _data(16, n=2, lo=0.3, hi=0.7)
    if kwargs.get("x_adv_student") == "x+0.2":
        kwargs = {"x_adv_student": x + 0.2}
    with pytest.raises(ValueError, match=match):
        proposition2_violations(model, model, x, y, 0.1, settings=AscentSettings(steps=1), **kwargs)


def test_bad_inputs_raise_value_error():
    model = _mlp(17)
    x, y = _data(17, n=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        input_gradient(model, x * 3, y)
    with pytest.raises(ValueError, match="y must"):
        input_gradient(model, x, y[:1])
    with pytest.raises(ValueError, match="distinct"):
        table4(model, model, x, y, radii=(0.1, 0.1 + 1e-12))
    with pytest.raises(ValueError, match="batch_size"):
        table4(model, model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="part"):
        llm_key(0.1, "mean")
    with pytest.raises(ValueError, match="signs"):
        table4(model, model, x, y, settings=AscentSettings(signs="up"))


# --------------------------------------------------------------------------- convergence


@pytest.fixture(scope="module")
def digits_pair():
    """Two ReLU MLPs trained briefly on 8x8 digits (float64) and 32 test images: models whose
    residual has the shape of a trained network's, unlike a random one's."""
    xs, ys = load_dataset("digits", "train", image_size=8)
    xs, ys = to_float(xs[:400]).double(), ys[:400]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        ).double()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(m(xs), ys).backward()
            opt.step()
        models.append(m.eval())
    xt, yt = load_dataset("digits", "test", image_size=8)
    return models[0], models[1], to_float(xt[:32]).double(), yt[:32]


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_adaptive_ascent_reaches_a_long_budget_where_a_plain_one_does_not(digits_pair, eps):
    """Default settings within 5% of 100 steps x 8 restarts, at ~1.5x the plain 10 steps."""
    model, _, x, y = digits_pair
    long = local_linearity(
        model, x, y, eps, settings=AscentSettings(steps=100, restarts=8), generator=_gen()
    )
    new = local_linearity(model, x, y, eps, generator=_gen())
    plain = local_linearity(
        model, x, y, eps, settings=AscentSettings(steps=10, restarts=1, **PLAIN), generator=_gen()
    )
    assert new.gamma.mean() >= 0.95 * long.gamma.mean()
    assert plain.gamma.mean() < 0.9 * long.gamma.mean()
    assert new.steps_used.double().mean() <= 15
    assert new.converged.double().mean() >= 0.5


def test_llm_records_steps_convergence_and_the_half_budget_value():
    model = _conv(20)
    x, y = _data(20, n=8)
    fixed = local_linearity(
        model, x, y, 0.1, settings=AscentSettings(steps=6, restarts=2, **PLAIN), generator=_gen()
    )
    assert torch.equal(fixed.steps_used, torch.full((8,), 12))  # patience 0: never stops
    assert not fixed.converged.any()
    res = local_linearity(
        model,
        x,
        y,
        0.1,
        settings=AscentSettings(steps=30, restarts=2, patience=2),
        generator=_gen(),
    )
    assert res.steps_used.dtype == torch.int64 and res.converged.dtype == torch.bool
    assert (res.steps_used <= 60).all() and (res.gamma_half <= res.gamma).all()
    assert res.converged.all() and (res.steps_used < 60).all()  # plateaus long before 30 steps
    no_steps = local_linearity(
        model, x, y, 0.1, settings=AscentSettings(steps=0, restarts=2), generator=_gen()
    )
    assert torch.equal(no_steps.gamma_half, no_steps.gamma)
    assert not no_steps.converged.any() and not no_steps.steps_used.any()


def test_half_budget_value_is_the_value_after_half_the_steps():
    model = _mlp(21)
    x, y = _data(21, n=6)
    ce0, g0 = input_gradient(model, x, y)
    for steps, restarts in ((8, 1), (3, 2), (5, 3)):
        seen = []
        res = local_linearity(
            model,
            x,
            y,
            0.2,
            settings=AscentSettings(steps=steps, restarts=restarts, patience=0),
            on_evaluate=seen.append,
        )
        # no early stop: each run evaluates steps points with a gradient, then its last point;
        # the half budget is reached after the half-th gradient step
        half = (steps * restarts + 1) // 2
        run, t = divmod(half - 1, steps)
        first = seen[: run * (steps + 1) + t + 1]
        r = torch.stack([residual(model, x, y, e, ce0, g0).abs() for e in first])
        torch.testing.assert_close(res.gamma_half, r.amax(0))


def test_table4_per_sample_values_agree_with_their_means():
    student, teacher = _mlp(22), _conv(23)
    x, y = _data(22, n=7)
    t4 = table4(
        student,
        teacher,
        x,
        y,
        settings=AscentSettings(steps=6, restarts=1),
        radii=(0.05, 0.1),
        batch_size=3,
        generator=_gen(),
    )
    ce_s, g_s = input_gradient(student, x, y)
    _, g_t = input_gradient(teacher, x, y)
    torch.testing.assert_close(torch.tensor(t4["ce/samples"], dtype=torch.float64), ce_s)
    gap_l2 = (g_s - g_t).flatten(1).norm(dim=1)
    torch.testing.assert_close(torch.tensor(t4["grad_gap_l2/samples"], dtype=torch.float64), gap_l2)
    assert t4["ce"] == pytest.approx(sum(t4["ce/samples"]) / 7, rel=1e-12)
    assert t4["grad_gap_l2"] == pytest.approx(sum(t4["grad_gap_l2/samples"]) / 7, rel=1e-12)
    for r in (0.05, 0.1):
        samples = t4[llm_key(r, "samples")]
        assert len(samples) == 7
        assert t4[llm_key(r)] == pytest.approx(sum(samples) / 7, rel=1e-12)
        # batches of 3 are independent: the per-sample γ equal a call on each batch
        part = local_linearity(
            student, x[3:6], y[3:6], r, settings=AscentSettings(steps=6, restarts=1)
        )
        torch.testing.assert_close(torch.tensor(samples[3:6], dtype=torch.float64), part.gamma)
        assert 0 <= t4[llm_key(r, "half")] <= t4[llm_key(r)]
        assert t4[llm_key(r, "half_ratio")] == pytest.approx(
            t4[llm_key(r, "half")] / t4[llm_key(r)], rel=1e-12
        )
        assert 0 <= t4[llm_key(r, "converged")] <= 1
        assert 0 < t4[llm_key(r, "steps")] <= 6


def test_table4_half_ratio_shows_a_budget_that_is_too_short():
    """With the plain ascent's short steps, the second half of the budget still gains a lot;
    with the adaptive ascent it gains little."""
    student, teacher = _conv(24), _mlp(25)
    x, y = _data(24, n=8)
    kw = dict(radii=(0.2,), generator=_gen())
    short = dict(steps=14, restarts=1)
    plain = table4(student, teacher, x, y, settings=AscentSettings(**PLAIN, **short), **kw)
    new = table4(student, teacher, x, y, settings=AscentSettings(**short), **kw)
    assert plain[llm_key(0.2, "half_ratio")] < 0.9
    assert new[llm_key(0.2, "half_ratio")] > 0.95
    assert plain[llm_key(0.2, "converged")] == 0 and plain[llm_key(0.2, "steps")] == 14


# --------------------------------------------------------------------------- violations


def test_violations_found_when_gamma_is_underestimated(digits_pair):
    """No ascent step (γ from one random point each): the bound fails at PGD points."""
    student, teacher, x, y = digits_pair
    check = proposition2_violations(
        student,
        teacher,
        x,
        y,
        0.1,
        settings=AscentSettings(steps=0, corners=False),
        generator=_gen(),
    )
    assert check.rate["pgd_student"] > 0.5 and check.rate["pgd_teacher"] > 0.5
    assert check.rate["all"] >= max(check.rate[k] for k in VIOLATION_KINDS)
    v = check.violated["pgd_student"]
    assert (check.gap_max["pgd_student"][v] > check.bound[v]).all()


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_no_violation_at_converged_settings(digits_pair, eps):
    student, teacher, x, y = digits_pair
    check = proposition2_violations(
        student,
        teacher,
        x,
        y,
        eps,
        settings=AscentSettings(steps=50, restarts=4),
        random_points=4,
        generator=_gen(),
    )
    assert check.rate == {k: 0.0 for k in (*VIOLATION_KINDS, "all")}
    n = len(x)
    assert check.points["pgd_student"] == check.points["pgd_teacher"] == n
    assert check.points["random"] == 4 * n
    assert check.points["ascent"] >= 2 * n  # at least every start of both ascents
    assert check.points["all"] == sum(check.points[k] for k in VIOLATION_KINDS)
    # the γ are each model's own: the same as local_linearity's
    own = local_linearity(
        student, x, y, eps, settings=AscentSettings(steps=50, restarts=4), generator=_gen()
    )
    torch.testing.assert_close(check.gamma_s, own.gamma)
    torch.testing.assert_close(check.bound, check.gamma_s + check.gamma_t + check.phi)


def test_violations_use_the_adversarial_examples_given():
    """A point where the student's residual is large, given as its adversarial example: found
    with γs from a random point, and no other PGD run or random point is made."""
    student, teacher = _Quadratic(a=1.0, b=0.0), _Constant()
    x = torch.full((3, *SHAPE), 0.5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    x_adv = x + 0.1
    short = AscentSettings(steps=0, restarts=1, corners=False)
    kw = dict(settings=short, pgd_steps=0, random_points=0, generator=_gen())
    check = proposition2_violations(student, teacher, x, y, 0.1, x_adv_student=x_adv, **kw)
    assert check.points == {"ascent": 6, "pgd_student": 3, "pgd_teacher": 0, "random": 0, "all": 9}
    assert check.rate["pgd_student"] == 1.0 and math.isnan(check.rate["pgd_teacher"])
    assert check.rate["all"] == 1.0
    fine = proposition2_violations(
        student,
        teacher,
        x,
        y,
        0.1,
        x_adv_student=x_adv,
        **{**kw, "settings": dataclasses.replace(short, steps=3)},
    )
    assert fine.rate["pgd_student"] == 0.0  # the adaptive ascent reaches the corner


@pytest.mark.parametrize("steps", [0, 6])
def test_table4_checks_proposition2_with_the_gamma_it_reports(digits_pair, steps):
    """One batch of checked samples, corner runs only (no random draw in the ascents): table4's
    check is proposition2_violations' exactly, without running the student's ascent twice.
    With no ascent step (γ from the two corners) the bound fails at some PGD points, and
    table4 says so."""
    student, teacher, x, y = digits_pair
    kw = dict(settings=AscentSettings(steps=steps, restarts=2))
    t4 = table4(student, teacher, x, y, radii=(0.1,), check_samples=len(x), generator=_gen(4), **kw)
    check = proposition2_violations(student, teacher, x, y, 0.1, generator=_gen(4), **kw)
    assert t4["prop2/n"] == len(x)
    for kind in (*VIOLATION_KINDS, "all"):
        got = t4[prop2_key(0.1)][kind]
        assert got["points"] == check.points[kind]
        assert got["rate"] == pytest.approx(check.rate[kind], abs=1e-12)
    torch.testing.assert_close(
        torch.tensor(t4[llm_key(0.1, "samples")], dtype=torch.float64), check.gamma_s
    )
    if steps == 0:
        assert t4[prop2_key(0.1)]["pgd_student"]["rate"] > 0.1
    else:
        assert t4[prop2_key(0.1)]["all"]["rate"] == 0.0


def test_table4_checks_only_the_first_samples_across_batches(digits_pair):
    student, teacher, x, y = digits_pair
    x, y = x[:7], y[:7]
    kw = dict(radii=(0.05, 0.1), settings=AscentSettings(steps=3, restarts=1))
    kw |= dict(batch_size=3, random_points=2)
    t4 = table4(student, teacher, x, y, check_samples=4, generator=_gen(5), **kw)
    assert t4["prop2/n"] == 4
    for r in (0.05, 0.1):
        points = t4[prop2_key(r)]
        assert points["pgd_student"]["points"] == points["pgd_teacher"]["points"] == 4
        assert points["random"]["points"] == 2 * 4
        assert points["ascent"]["points"] >= 2 * 4  # at least each start of both ascents
    # no check: no key, and the same γ (the check draws after each batch's student ascent,
    # and restarts=1 draws nothing)
    plain = table4(student, teacher, x, y, generator=_gen(5), **kw)
    assert "prop2/n" not in plain and prop2_key(0.1) not in plain
    assert plain[llm_key(0.1, "samples")] == t4[llm_key(0.1, "samples")]
    with pytest.raises(ValueError, match="check_samples"):
        table4(student, teacher, x, y, check_samples=-1)


# --------------------------------------------------------------------------- primitives


def test_the_ball_primitives_are_the_attacks_ones():
    for name in ("init_delta", "step_delta", "project_delta", "perturbation_norm"):
        assert getattr(kdiga.bounds.ascent, name) is getattr(kdiga.attacks, name)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fixed_ascent_starts_and_steps_like_pgd(norm):
    """The first point of a plain run is init_delta's random start, the next one
    project_delta(step_delta(·)) along the gradient of |r| (L2: ball, then box)."""
    model = _conv(26)
    x, y = _data(26, n=4)
    x[:, :, :2] = 0.999  # near the box's edge: the order of box and ball matters there
    eps, step = 0.8, 0.5
    seen = []
    local_linearity(
        model,
        x,
        y,
        eps,
        settings=AscentSettings(steps=1, step_size=step, norm=norm, **PLAIN),
        generator=_gen(3),
        on_evaluate=seen.append,
    )
    e0 = init_delta(x, eps, norm, True, _gen(3))
    torch.testing.assert_close(seen[0], e0)
    ce0, g0 = input_gradient(model, x, y)
    e = e0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(residual(model, x, y, e, ce0, g0).abs().sum(), e)
    torch.testing.assert_close(
        seen[1], project_delta(x, step_delta(e0, grad, step, norm), eps, norm)
    )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adaptive_ascent_starts_at_the_corners(norm):
    model = _mlp(27)
    x, y = _data(27, n=4)
    seen = []
    local_linearity(
        model,
        x,
        y,
        0.3,
        settings=AscentSettings(steps=1, restarts=2, norm=norm, patience=0),
        on_evaluate=seen.append,
    )
    _, g0 = input_gradient(model, x, y)
    for i, sign in ((0, 1.0), (2, -1.0)):  # each run: its start, then its last point
        corner = project_delta(x, step_delta(torch.zeros_like(x), sign * g0, 0.3, norm), 0.3, norm)
        torch.testing.assert_close(seen[i], corner)


# --------------------------------------------------------------------------- teacher's share


def test_table4_from_a_saved_teacher_share_is_table4(digits_pair, tmp_path):
    """The teacher's share computed apart, saved and loaded, then the student's part drawing
    from the same generator: the same table as one table4 call; a share made for other
    settings is refused, naming the setting."""
    student, teacher, x, y = digits_pair
    kw = dict(radii=(0.05, 0.1), settings=AscentSettings(steps=3), batch_size=5)
    kw |= dict(check_samples=7, random_points=2, pgd_steps=2)
    whole = table4(student, teacher, x, y, generator=_gen(6), **kw)
    gen = _gen(6)
    share = teacher_share(
        teacher, x, y, generator=gen, **{k: v for k, v in kw.items() if k != "random_points"}
    )
    save_teacher_share(share, tmp_path / "t.safetensors", {"note": "made here"})
    loaded = load_teacher_share(tmp_path / "t.safetensors")
    assert loaded.checked == 7 and len(loaded.checks) == 2 and loaded.checks[0].x_adv is not None
    parts = table4(student, teacher, x, y, generator=gen, share=loaded, **kw)
    assert parts == whole
    assert whole[prop2_key(0.1)]["ascent"]["points"] > 2 * 7
    other = {**kw, "settings": AscentSettings(steps=4)}
    with pytest.raises(ValueError, match="settings"):
        table4(student, teacher, x, y, share=loaded, **other)
