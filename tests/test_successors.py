"""AdaAD, IAD and IGDM (kdiga.losses_successors) against plain transcriptions of the authors'
training steps, their inner maximisations, their epoch schedules through ``fit``, and their
settings' validation.

The transcriptions follow boyellow/AdaAD ``main.py``/``AT_helper.py``, ZFancy/IAD ``IAD-I.py``
/``IAD-II.py`` and HongsinLee/saad ``igdm.py`` line by line (``nn.KLDivLoss``, per-sample
loops, ``.item()``), in float64, on the same adversarial points as kdiga's loss (a fixed δ
replaces the inner maximisation, or both run it from the same start).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny_study import TINY, bin_path, copy_study, run, write_params
from torch import nn

from kdiga import losses
from kdiga.attacks import pgd
from kdiga.data import load_dataset
from kdiga.losses_successors import kl_rows
from kdiga.methods import build_loss
from kdiga.stats import NEEDS_SEEDS
from kdiga.train import TrainConfig, fit
from pipeline.params import ParamError, validate

B, N = 6, 5
TOL = {"atol": 1e-6, "rtol": 0.0}


# ----------------------------------------------------------------------------- helpers


def bn_net(seed: int) -> nn.Module:
    """Conv + BatchNorm + tanh on [B, 1, 6, 6], float64: train-mode BatchNorm ties a batch
    together, so a loss that forwarded other batches than the authors' would not agree."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(64, N)
    )
    return net.double()


def teacher_net(seed: int) -> nn.Module:
    """A BatchNorm teacher with running statistics unlike its batch statistics, frozen and in
    eval mode (as the authors' scripts and ``fit`` hold it)."""
    net = bn_net(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            net(2 * torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64))
    return net.eval().requires_grad_(False)


def mlp(seed: int, n: int = N) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, n))


def batch(seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 6, 6, generator=g, dtype=dtype)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.99])  # pixels at and near the box's edges
    return x, torch.randint(0, N, (B,), generator=g)


class FixedPGD:
    """Stands in for kdiga.attacks.pgd: clamp(x + δ) for a fixed δ; records the calls."""

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta
        self.calls: list[dict] = []

    def __call__(self, model, x, y, **kw):
        self.calls.append({"model": model, **kw})
        return (x + self.delta).clamp(0, 1)


def fixed_delta(seed: int = 7, eps: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return eps * (2 * torch.rand(B, 1, 6, 6, generator=g, dtype=torch.float64) - 1)


def loss_and_grads(student: nn.Module, loss: torch.Tensor):
    grads = torch.autograd.grad(loss, list(student.parameters()))
    return loss.detach(), grads


def assert_agree(ours, theirs) -> None:
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    assert len(ours[1]) == len(theirs[1])
    for g_ours, g_theirs in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(g_ours, g_theirs, **TOL)


def ours(method: str, student, teacher, x, y, *, epoch=None, epochs=None, **cfg):
    """kdiga's loss and the student's parameter gradients, on a copy of the student."""
    student = copy.deepcopy(student).train()
    loss = build_loss(method, **cfg)
    if epoch is not None:
        loss.set_epoch(epoch, epochs)
    parts = loss(student, teacher, x, y)
    return loss_and_grads(student, parts["loss"]), parts


# ----------------------------------------------------------------------------- transcriptions


def authors_adaad(student, teacher, inputs, adv_inputs, alpha, *, cifar10_mean=False):
    """boyellow/AdaAD main.py, method AdaAD: the CIFAR-100 branch (sum / B, i.e. batchmean),
    or with ``cifar10_mean`` its CIFAR-10 branch (``nn.KLDivLoss()``: mean over B·N)."""
    student.train()
    ori_outputs = student(inputs)
    adv_outputs = student(adv_inputs)
    with torch.no_grad():
        teacher.eval()
        t_ori_outputs = teacher(inputs)
        t_adv_outputs = teacher(adv_inputs)
    if cifar10_mean:
        kl_loss1 = nn.KLDivLoss()(
            F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1)
        )
        kl_loss2 = nn.KLDivLoss()(
            F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1)
        )
    else:
        kl_loss1 = (1 / len(adv_outputs)) * torch.sum(
            nn.KLDivLoss(reduction="none")(
                F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1)
            )
        )
        kl_loss2 = (1 / len(adv_outputs)) * torch.sum(
            nn.KLDivLoss(reduction="none")(
                F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1)
            )
        )
    return alpha * kl_loss1 + (1 - alpha) * kl_loss2


def authors_adaad_inner(model, teacher_model, x_natural, step_size, steps, epsilon):
    """boyellow/AdaAD AT_helper.adaad_inner_loss with random_init=False, BN_eval=True."""
    criterion_kl = nn.KLDivLoss(reduction="none")
    model.eval()
    teacher_model.eval()
    x_adv = x_natural.detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(
                F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_model(x_adv), dim=1)
            )
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def authors_iad(
    basic_net,
    teacher_net,
    inputs,
    targets,
    pert_inputs,
    *,
    epoch,
    begin,
    alpha,
    beta,
    temp,
    weighted_teacher=False,
):
    """ZFancy/IAD IAD-I.py's train step on given adversarial points; ``weighted_teacher``:
    the teacher's term weighted by Alpha as in IAD-II.py (its AKD² second teacher left out)."""
    KL_loss = nn.KLDivLoss(reduction="none")
    XENT_loss = nn.CrossEntropyLoss()
    basic_net.train()
    teacher_outputs = teacher_net(inputs)
    outputs = basic_net(pert_inputs)
    Alpha = torch.ones(len(inputs), dtype=outputs.dtype)
    guide = teacher_net(pert_inputs)
    n = len(outputs)
    teacher_kl = KL_loss(
        F.log_softmax(outputs / temp, dim=1), F.softmax(teacher_outputs / temp, dim=1)
    ).sum(dim=1)
    if epoch >= begin:
        for pp in range(len(outputs)):
            L = F.softmax(guide, dim=1)[pp][targets[pp].item()]
            L = L.pow(beta).item()
            Alpha[pp] = L
        if weighted_teacher:
            teacher_kl = teacher_kl.mul(Alpha)
        return (
            alpha * temp * temp * (1 / n) * torch.sum(teacher_kl)
            + alpha
            * (1 / n)
            * torch.sum(
                KL_loss(F.log_softmax(outputs, dim=1), F.softmax(basic_net(inputs), dim=1))
                .sum(dim=1)
                .mul(1 - Alpha)
            )
            + (1.0 - alpha) * XENT_loss(basic_net(inputs), targets)
        )
    return alpha * temp * temp * (1 / n) * torch.sum(teacher_kl) + (1.0 - alpha) * XENT_loss(
        basic_net(inputs), targets
    )


def authors_iad_inner(basic_net, inputs, targets, step_size, epsilon, num_steps):
    """ZFancy/IAD IAD-I.py AttackPGD.forward from x itself (no random start) and with the
    student in eval mode (kdiga's documented departure: theirs runs in train mode)."""
    basic_net.eval()
    x = inputs.detach()
    for _ in range(num_steps):
        x.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(basic_net(x), targets, reduction="sum")
        grad = torch.autograd.grad(loss, [x])[0]
        x = x.detach() + step_size * torch.sign(grad.detach())
        x = torch.min(torch.max(x, inputs - epsilon), inputs + epsilon)
        x = torch.clamp(x, 0.0, 1.0)
    basic_net.train()
    return x


def authors_igdm(student, teacher, X, inputs_adv, *, epoch, igdm_alpha):
    """HongsinLee/saad igdm.py's train step (``epoch`` 1-based, its literal 200 epochs)."""
    criterion_kl = nn.KLDivLoss(reduction="batchmean")
    student.train()
    with torch.no_grad():
        delta = inputs_adv - X
        teacher_plus = teacher(inputs_adv)
        teacher_minus = teacher(X - delta)
    student_plus = student(X + delta)
    student_minus = student(X - delta)
    IGDM_loss = criterion_kl(
        F.log_softmax(student_plus - student_minus, dim=1),
        F.softmax((teacher_plus - teacher_minus).detach(), dim=1),
    )
    kl_loss = criterion_kl(F.log_softmax(student_plus, dim=1), F.softmax(teacher_plus, dim=1))
    return kl_loss + igdm_alpha * (epoch / 200) * IGDM_loss


def theirs(fn, student, *args, **kw):
    student = copy.deepcopy(student)
    return loss_and_grads(student, fn(student, *args, **kw))


# ----------------------------------------------------------------------------- AdaAD


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # their CIFAR-10 branch
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_adaad_equals_the_authors_step(alpha, monkeypatch):
    fake = FixedPGD(fixed_delta())
    monkeypatch.setattr(losses, "pgd", fake)
    student, teacher = bn_net(0), teacher_net(1)
    x, y = batch()
    got, parts = ours("adaad", student, teacher, x, y, adaad_alpha=alpha, eps=0.1, steps=3)
    x_adv = (x + fake.delta).clamp(0, 1)
    assert_agree(got, theirs(authors_adaad, student, teacher, x, x_adv, alpha))
    assert set(parts) == ({"loss", "robust_kl"} if alpha == 1 else {"loss", "robust_kl", "kl"})
    (call,) = fake.calls
    assert (call["eps"], call["steps"]) == (0.1, 3)
    if alpha == 1:  # their CIFAR-10 branch's nn.KLDivLoss() is ours / N
        mean = authors_adaad(copy.deepcopy(student), teacher, x, x_adv, 1.0, cifar10_mean=True)
        torch.testing.assert_close(mean * N, got[0], **TOL)


def test_adaad_inner_maximisation_equals_the_authors(monkeypatch):
    """From the same start (x itself), kdiga's ascent on KL(T ‖ S) through both models reaches
    the authors' point."""
    monkeypatch.setattr(losses, "pgd", lambda *a, **kw: pgd(*a, random_start=False, **kw))
    seen = []
    real_attack = losses.DistillLoss._attack

    def spy(self, model, x, y, **kw):
        seen.append(real_attack(self, model, x, y, **kw))
        return seen[-1]

    monkeypatch.setattr(losses.DistillLoss, "_attack", spy)
    student, teacher = bn_net(2), teacher_net(3)
    x, y = batch(seed=2)
    want = authors_adaad_inner(copy.deepcopy(student), teacher, x, 0.02, 4, 0.05)
    build_loss("adaad", eps=0.05, steps=4, step_size=0.02)(student, teacher, x, y)
    torch.testing.assert_close(seen[0], want, **TOL)
    assert not torch.equal(want, x)


# ----------------------------------------------------------------------------- IAD


@pytest.mark.parametrize(
    ("epoch", "weight_teacher", "alpha", "temp"),
    [(59, False, 1.0, 1.0), (60, False, 1.0, 1.0), (150, False, 0.8, 2.0), (60, True, 0.8, 2.0)],
)
def test_iad_equals_the_authors_step(epoch, weight_teacher, alpha, temp, monkeypatch):
    """Warm-up 0.3 of 200 epochs is their ``--begin 60``: epoch 59 is ARD, 60 introspects."""
    fake = FixedPGD(fixed_delta(seed=8))
    monkeypatch.setattr(losses, "pgd", fake)
    student, teacher = bn_net(4), teacher_net(5)
    x, y = batch(seed=3)
    cfg = {"iad_alpha": alpha, "iad_beta": 0.1, "iad_warmup": 0.3, "temperature": temp}
    got, parts = ours(
        "iad",
        student,
        teacher,
        x,
        y,
        epoch=epoch,
        epochs=200,
        iad_weight_teacher=weight_teacher,
        **cfg,
    )
    x_adv = (x + fake.delta).clamp(0, 1)
    want = theirs(
        authors_iad,
        student,
        teacher,
        x,
        y,
        x_adv,
        epoch=epoch,
        begin=60,
        alpha=alpha,
        beta=0.1,
        temp=temp,
        weighted_teacher=weight_teacher,
    )
    assert_agree(got, want)
    assert set(parts) == {"loss", "ce", "kl", "introspection", "reliability"}
    with torch.no_grad():
        p_true = F.softmax(teacher(x_adv), dim=1)[torch.arange(B), y]
    torch.testing.assert_close(parts["reliability"], p_true.pow(0.1).mean(), **TOL)
    (call,) = fake.calls
    assert call.get("loss_fn") is None  # ARD's inner maximisation: the student's CE


def test_iad_inner_maximisation_equals_the_authors(monkeypatch):
    monkeypatch.setattr(losses, "pgd", lambda *a, **kw: pgd(*a, random_start=False, **kw))
    seen = []
    real_attack = losses.DistillLoss._attack

    def spy(self, model, x, y, **kw):
        seen.append(real_attack(self, model, x, y, **kw))
        return seen[-1]

    monkeypatch.setattr(losses.DistillLoss, "_attack", spy)
    student, teacher = bn_net(6), teacher_net(7)
    x, y = batch(seed=4)
    want = authors_iad_inner(copy.deepcopy(student), x, y, 0.02, 0.05, 4)
    build_loss("iad", eps=0.05, steps=4, step_size=0.02)(student, teacher, x, y)
    torch.testing.assert_close(seen[0], want, **TOL)


@pytest.mark.parametrize(
    ("warmup", "epochs", "first"), [(0.3, 200, 60), (0.3, 12, 4), (0.0, 5, 0), (1.0, 5, 5)]
)
def test_iad_warmup_ends_at_the_rounded_fraction_of_the_epochs(warmup, epochs, first):
    loss = build_loss("iad", iad_warmup=warmup)
    assert loss.introspecting  # outside fit: the schedule's end
    on = []
    for e in range(epochs):
        loss.set_epoch(e, epochs)
        on.append(loss.introspecting)
    assert on == [e >= first for e in range(epochs)]


# ----------------------------------------------------------------------------- IGDM


@pytest.mark.parametrize("epoch", [1, 137, 200])
def test_igdm_equals_the_authors_step(epoch, monkeypatch):
    """Their epoch e (1-based, of their 200) is kdiga's epoch e - 1 of 200."""
    fake = FixedPGD(fixed_delta(seed=9))
    monkeypatch.setattr(losses, "pgd", fake)
    student, teacher = bn_net(8), teacher_net(9)
    x, y = batch(seed=5)
    got, parts = ours("igdm", student, teacher, x, y, epoch=epoch - 1, epochs=200, igdm_weight=3.0)
    x_adv = (x + fake.delta).clamp(0, 1)
    want = theirs(authors_igdm, student, teacher, x, x_adv, epoch=epoch, igdm_alpha=3.0)
    assert_agree(got, want)
    assert set(parts) == {"loss", "robust_kl", "igdm"}
    assert parts["igdm"] > 0
    (call,) = fake.calls  # AdaAD's inner maximisation: the student and the teacher together
    assert call["loss_fn"].__name__ == "_disagreement"


def test_igdm_ramp_is_linear_in_the_epochs_and_full_outside_fit(monkeypatch):
    monkeypatch.setattr(losses, "pgd", FixedPGD(fixed_delta(seed=10)))
    student, teacher = bn_net(10), teacher_net(11)
    x, y = batch(seed=6)
    loss = build_loss("igdm", igdm_weight=2.0)
    full = loss(student, teacher, x, y)
    assert loss.current_weight == 2.0
    torch.testing.assert_close(full["loss"], full["robust_kl"] + 2.0 * full["igdm"])
    for epoch in range(4):
        loss.set_epoch(epoch, 4)
        parts = loss(student, teacher, x, y)
        weight = 2.0 * (epoch + 1) / 4
        torch.testing.assert_close(parts["loss"], parts["robust_kl"] + weight * parts["igdm"])


# ----------------------------------------------------------------------------- inner problems


def _objective(method, student, teacher, x, y):
    """[B] what each method's inner maximisation maximises, in eval mode."""
    with torch.no_grad():
        s = student.eval()(x)
        student.train()
        if method == "iad":
            return F.cross_entropy(s, y, reduction="none")
        return kl_rows(teacher(x), s)


@pytest.mark.parametrize("method", ["adaad", "iad", "igdm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inner_maximisation_raises_its_objective_and_stays_in_the_ball(method, seed, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(pgd(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(losses, "pgd", spy)
    student, teacher = mlp(seed), mlp(seed + 10).eval()
    teacher.train()  # the loss must run the teacher in eval mode and give its mode back
    x, y = batch(seed=seed, dtype=torch.float32)
    torch.manual_seed(seed)
    eps = 0.1
    parts = build_loss(method, eps=eps, steps=10, step_size=0.025)(student, teacher, x, y)
    parts["loss"].backward()
    assert student.training and teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    (x_adv,) = seen
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    at_x = _objective(method, student, teacher.eval(), x, y)
    at_adv = _objective(method, student, teacher, x_adv, y)
    assert (at_adv > at_x).all(), (at_adv, at_x)


class Counted(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.train_calls = 0

    def forward(self, x):
        self.train_calls += int(self.training)
        return self.net(x)


@pytest.mark.parametrize("method", ["adaad", "iad", "igdm"])
def test_teacher_never_runs_in_train_mode(method):
    teacher = Counted(bn_net(1)).train()
    x, y = batch()
    loss = build_loss(method, steps=2, **({"adaad_alpha": 0.5} if method == "adaad" else {}))
    loss(bn_net(0), teacher, x, y)["loss"].backward()
    assert teacher.train_calls == 0 and teacher.training


# ----------------------------------------------------------------------------- fit's hook


class Scheduled(nn.Module):
    """CE with a set_epoch that records what ``fit`` tells it."""

    requires_teacher = False

    def __init__(self) -> None:
        super().__init__()
        self.heard: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.heard.append((epoch, epochs))

    def forward(self, student, teacher, x, y, teacher_out=None):
        loss = F.cross_entropy(student(x), y)
        return {"loss": loss}


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic", "train", n=32, image_size=6, channels=1, seed=3)


def _stop_after(epoch: int):
    def on_epoch(record):
        if record["epoch"] == epoch:
            raise Stop

    return on_epoch


def _stop_at(epoch: int, batch: int):
    def on_batch(record):
        if (record["epoch"], record["batch"]) == (epoch, batch):
            raise Stop

    return on_batch


@pytest.mark.parametrize("mid_epoch", [False, True])
def test_fit_tells_the_loss_each_epoch_and_a_resumed_run_the_same(tiny, tmp_path, mid_epoch):
    x, y = tiny
    cfg = TrainConfig(epochs=4, batch_size=8, augment="none", checkpoint_every=int(mid_epoch))
    whole = Scheduled()
    fit(mlp(0, 10), whole, x, y, cfg)
    assert whole.heard == [(0, 4), (1, 4), (2, 4), (3, 4)]
    first, path = Scheduled(), tmp_path / "run.pt"
    stop = {"on_batch": _stop_at(2, 2)} if mid_epoch else {"on_epoch": _stop_after(2)}
    with pytest.raises(Stop):
        fit(mlp(0, 10), first, x, y, cfg, checkpoint_path=path, **stop)
    resumed = Scheduled()
    fit(mlp(0, 10), resumed, x, y, cfg, checkpoint_path=path)
    assert first.heard == [(0, 4), (1, 4)]
    # mid-epoch: epoch 1 (0-based) was checkpointed at its third step and resumes there
    assert resumed.heard == ([(1, 4), (2, 4), (3, 4)] if mid_epoch else [(2, 4), (3, 4)])


def test_igdm_resumed_run_ends_with_the_uninterrupted_runs_weights(tiny, tmp_path):
    x, y = tiny
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, augment="none")
    teacher = mlp(5, 10)
    init = mlp(0, 10)

    def run(loss, path=None, **kw):
        student = copy.deepcopy(init)
        fit(student, loss, x, y, cfg, teacher=teacher, checkpoint_path=path, **kw)
        return student

    def igdm():
        return build_loss("igdm", eps=0.1, steps=2, igdm_weight=50.0)

    whole = run(igdm())
    with pytest.raises(Stop):
        run(igdm(), tmp_path / "a.pt", on_epoch=_stop_after(1))
    resumed = run(igdm(), tmp_path / "a.pt")
    sw, sr = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(sw[k], sr[k]) for k in sw)
    # The ramp matters: the same run with its weight held at the end ends elsewhere.
    held = igdm()
    held.set_epoch = lambda epoch, epochs: None
    sh = run(held).state_dict()
    assert not all(torch.equal(sw[k], sh[k]) for k in sw)


def test_set_epoch_checks_its_arguments():
    loss = build_loss("igdm")
    for epoch, epochs in [(-1, 3), (3, 3), (1.0, 3), (0, True)]:
        with pytest.raises(ValueError, match="0 <= epoch < epochs"):
            loss.set_epoch(epoch, epochs)
    build_loss("kd").set_epoch(0, 3)  # the base hook: accepted, nothing to schedule


# ----------------------------------------------------------------------------- settings


def test_defaults_are_the_authors():
    assert build_loss("adaad").config_dict() == {
        "eps": pytest.approx(8 / 255),
        "steps": 10,
        "step_size": None,  # pgd's 2.5·eps/steps = 2/255
        "adaad_alpha": 1.0,
        "norm": "linf",
    }
    iad = build_loss("iad").config_dict()
    assert {k: iad[k] for k in iad if k.startswith("iad_") or k == "temperature"} == {
        "temperature": 1.0,
        "iad_alpha": 1.0,
        "iad_beta": 0.1,
        "iad_warmup": 0.3,
        "iad_weight_teacher": False,
    }
    assert build_loss("igdm").config.igdm_weight == 1.0
    for name in ("adaad", "iad", "igdm"):
        loss = build_loss(name)
        assert loss.requires_teacher and not loss.accepts_teacher_cache


@pytest.mark.parametrize(
    ("method", "cfg", "needle"),
    [
        ("adaad", {"adaad_alpha": 1.5}, r"adaad_alpha must be in \[0, 1\]"),
        ("adaad", {"adaad_alpha": -0.1}, r"adaad_alpha.*>= 0"),
        ("iad", {"iad_alpha": 2}, r"iad_alpha must be in \[0, 1\]"),
        ("iad", {"iad_beta": -1.0}, r"iad_beta.*>= 0"),
        ("iad", {"iad_warmup": 1.2}, r"iad_warmup must be in \[0, 1\]"),
        ("iad", {"iad_weight_teacher": "yes"}, "iad_weight_teacher must be True or False"),
        ("igdm", {"igdm_weight": float("inf")}, "igdm_weight.*finite"),
        ("igdm", {"temperature": 2.0}, "unknown setting 'temperature'"),
        ("adaad", {"iad_beta": 0.2}, "unknown setting 'iad_beta'"),
    ],
)
def test_bad_setting_raises(method, cfg, needle):
    with pytest.raises(ValueError, match=needle):
        build_loss(method, **cfg)


def _params(**distill):
    raw = {
        "teachers": {"t": {"arch": "small_cnn"}},
        "students": {"s": {"arch": "small_cnn"}},
        "distill": {"methods": ["adaad", "iad", "igdm"], **distill},
    }
    return validate(raw)


def test_params_sections_reach_the_losses():
    from kdiga.methods import get_method

    study = _params(
        adaad={"alpha": 0.5},
        iad={"alpha": 0.9, "beta": 0.2, "warmup": 0.5, "weight_teacher": True},
        igdm={"weight": 4.0},
    )
    distill = study.value("distill")
    assert get_method("adaad").settings(distill)["adaad_alpha"] == 0.5
    iad = build_loss("iad", **get_method("iad").settings(distill)).config
    assert (iad.iad_alpha, iad.iad_beta, iad.iad_warmup, iad.iad_weight_teacher) == (
        0.9,
        0.2,
        0.5,
        True,
    )
    assert build_loss("igdm", **get_method("igdm").settings(distill)).config.igdm_weight == 4.0
    defaults = _params().value("distill")
    for name in ("adaad", "iad", "igdm"):  # the schema's defaults are LossConfig's
        method = get_method(name)
        assert build_loss(name, **method.settings(defaults)).config_dict() == {
            **build_loss(name).config_dict(),
            **method.settings(defaults),
        }


@pytest.mark.parametrize(
    ("section", "value", "needle"),
    [
        ({"adaad": {"alpha": 1.5}}, "distill.adaad.alpha = 1.5", "[0, 1]"),
        ({"iad": {"warmup": 2}}, "distill.iad.warmup = 2", "fraction of the epochs"),
        ({"iad": {"beta": -0.1}}, "distill.iad.beta = -0.1", ">= 0"),
        ({"iad": {"weight_teacher": 1}}, "distill.iad.weight_teacher = 1", "true or false"),
        ({"igdm": {"weight": "big"}}, "distill.igdm.weight = 'big'", ">= 0"),
        ({"igdm": {"ramp": 1}}, "distill.igdm.ramp", "known keys: weight"),
    ],
)
def test_bad_params_name_the_key(section, value, needle):
    with pytest.raises(ParamError) as err:
        _params(**section)
    assert str(err.value).startswith(f"params: {value}") and needle in str(err.value)


# -- in a study ------------------------------------------------------------------------------

SUCCESSORS = ["kd", "kdiga", "kdiga_arda", "adaad", "iad", "igdm"]


@pytest.mark.slow
def test_the_successors_run_through_a_tiny_study(tiny_study_built, tmp_path):
    """adaad, iad and igdm train, are attacked and bounded like any method, and the report
    puts KDIGA beside them: KDIGA against IGDM, KDIGA-ARDA against AdaAD (one seed: no
    verdict, the intervals over the images only)."""
    study = copy_study(tiny_study_built, tmp_path / "study")
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["distill"]["methods"] = SUCCESSORS
    write_params(study, params)
    run([bin_path("snakemake"), "--cores", "2"], study)
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    for method in ("adaad", "iad", "igdm"):
        model = f"pgdat--{method}--small_cnn--s0"
        bounds = json.loads((study / "data" / "bounds" / f"{model}.json").read_text())
        assert len(bounds["llm_per_sample"][0]) == bounds["n"] == TINY["bounds"]["samples"]
        assert model in (study / "reports" / "report.md").read_text()
    claims = metrics["claims"]
    for key in ("pgdat/small_cnn/kdiga-igdm/robust", "pgdat/small_cnn/kdiga_arda-adaad/robust"):
        assert claims[key]["verdict"] == NEEDS_SEEDS, claims[key]
        assert -100 <= claims[key]["difference"] <= 100
    report = (study / "reports" / "report.md").read_text()
    assert "KDIGA is more robust than IGDM (KDIGA − IGDM)" in report
    assert "KDIGA-ARDA is more robust than AdaAD" in report
