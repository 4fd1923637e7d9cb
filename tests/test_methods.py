"""Tests for kdiga.methods: the method table agrees with the loss classes and their behaviour,
maps a distill params section to build_loss settings, and takes a new method in one entry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kdiga import losses
from kdiga.losses import DistillLoss, KDLoss
from kdiga.methods import (
    KD,
    METHODS,
    SECTION_KWARGS,
    Method,
    allowed_keys,
    build_loss,
    get_method,
    loss_names,
    method_names,
    register,
    unregister,
)

#: A validated distill section (pipeline/params/) with the training keys every method reads.
DISTILL = {
    "epochs": 3,
    "batch_size": 64,
    "ce_weight": 0.3,
    "kl_weight": 0.7,
    "temperature": 4.0,
    "iga": {"weight": 2.0, "reduction": "batch_frobenius", "grad_mode": "eval"},
    "adversarial": {"eps": 0.03, "steps": 5, "step_size": None},
    "rslad": {"adv_weight": 0.8333333333333334},
    "adaad": {"alpha": 0.9},
    "iad": {"alpha": 0.8, "beta": 0.2, "warmup": 0.25, "weight_teacher": True},
    "igdm": {"weight": 2.5},
}
_KD = {"ce_weight": 0.3, "kl_weight": 0.7, "temperature": 4.0}
_IGA = {"iga_weight": 2.0, "iga_reduction": "batch_frobenius", "student_grad_mode": "eval"}
_ADV = {"eps": 0.03, "steps": 5, "step_size": None}
#: What the distill stage passed to build_loss before the table existed, then the later
#: methods' (RSLAD, AdaAD, IAD, IGDM).
EXPECTED_SETTINGS = {
    "st": {},
    "kd": _KD,
    "ard": {**_KD, **_ADV},
    "kdiga": {**_KD, **_IGA},
    "kdiga_ardc": {**_KD, **_IGA, **_ADV},
    "kdiga_arda": {**_KD, **_IGA, **_ADV},
    "rslad": {"temperature": 4.0, **_ADV, "adv_weight": 0.8333333333333334},
    "adaad": {**_ADV, "adaad_alpha": 0.9},
    "iad": {
        "temperature": 4.0,
        **_ADV,
        "iad_alpha": 0.8,
        "iad_beta": 0.2,
        "iad_warmup": 0.25,
        "iad_weight_teacher": True,
    },
    "igdm": {**_ADV, "igdm_weight": 2.5},
}
LABELS = {
    "st": "ST",
    "kd": "KD",
    "ard": "ARD",
    "kdiga": "KDIGA",
    "kdiga_ardc": "KDIGA-ARDC",
    "kdiga_arda": "KDIGA-ARDA",
    "rslad": "RSLAD",
    "adaad": "AdaAD",
    "iad": "IAD",
    "igdm": "IGDM",
}


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 4))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(5, 1, 6, 6, generator=g), torch.randint(0, 4, (5,), generator=g)


@pytest.fixture
def registered():
    """Registers entries for one test and removes them afterwards."""
    names: list[str] = []

    def add(method: Method) -> Method:
        out = register(method)
        names.append(method.name)
        return out

    yield add
    for name in names:
        if name in METHODS:
            unregister(name)


# ----------------------------------------------------------------------------- the table


def test_order_and_labels():
    assert method_names() == tuple(LABELS)
    assert {m.name: m.label for m in METHODS.values()} == LABELS
    assert all(get_method(name) is METHODS[name] for name in METHODS)


@pytest.mark.parametrize("name", list(EXPECTED_SETTINGS))
def test_settings_equal_the_distill_stage_mapping(name):
    got = get_method(name).settings(DISTILL)
    assert got == EXPECTED_SETTINGS[name]
    assert got is not get_method(name).settings(DISTILL)  # a fresh dict each call


@pytest.mark.parametrize("name", list(EXPECTED_SETTINGS))
def test_table_agrees_with_the_loss_class(name):
    method = get_method(name)
    settings = method.settings(DISTILL)
    loss = build_loss(name, **settings)
    assert type(loss) is method.loss_class
    assert loss.requires_teacher == method.needs_teacher
    assert loss.accepts_teacher_cache == method.cacheable
    assert method.cacheable == (method.needs_teacher and not method.teacher_at_adversarial)
    # build_loss accepts exactly the settings plus the attack norm the section leaves unset
    assert allowed_keys(name) == method.loss_keys
    unset = {"norm"} if method.inner_attack else set()
    assert set(allowed_keys(name)) == set(settings) | unset
    assert {k: v for k, v in loss.config_dict().items() if k in settings} == settings


class _Recorder:
    """Stands in for kdiga.attacks.pgd: records the call, returns x + 0.02 clamped."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, x, y, **kw):
        self.calls += 1
        return (x + 0.02).clamp(0, 1)


class _Forbidden(nn.Module):
    def forward(self, x):
        raise AssertionError("the teacher must not be called when cached signals serve it")


@pytest.mark.parametrize("name", list(EXPECTED_SETTINGS))
def test_table_agrees_with_the_loss_behaviour(name, monkeypatch):
    """needs_teacher, inner_attack, iga and cacheable, observed through one step."""
    method = get_method(name)
    fake = _Recorder()
    monkeypatch.setattr(losses, "pgd", fake)
    student, teacher = mlp(0), mlp(1)
    x, y = batch()
    loss = build_loss(name)
    parts = loss(student, teacher, x, y)
    assert fake.calls == int(method.inner_attack)
    assert ("iga" in parts) == method.iga
    if method.needs_teacher:
        with pytest.raises(ValueError, match="needs a teacher"):
            loss(student, None, x, y)
    else:
        loss(student, None, x, y)
    if method.cacheable:
        cached = loss(
            student, _Forbidden(), x, y, teacher_out=losses.teacher_signals(teacher, x, y)
        )
        torch.testing.assert_close(cached["loss"], parts["loss"])
    elif method.needs_teacher:
        bogus = losses.TeacherSignals(torch.zeros(5, 4), torch.zeros(5, 1, 6, 6))
        with pytest.raises(AssertionError, match="must not be called"):
            loss(student, _Forbidden(), x, y, teacher_out=bogus)


def test_param_keys_are_distill_section_keys():
    assert {k for m in METHODS.values() for k in m.param_keys} == set(SECTION_KWARGS)
    assert get_method("st").param_keys == ()
    assert get_method("kd").param_keys == ("ce_weight", "kl_weight", "temperature")
    assert get_method("kdiga").param_keys == ("ce_weight", "kl_weight", "temperature", "iga")
    assert get_method("ard").param_keys == ("ce_weight", "kl_weight", "temperature", "adversarial")
    assert get_method("rslad").param_keys == ("temperature", "adversarial", "rslad")


def test_flags():
    flags = {
        m.name: (m.needs_teacher, m.teacher_at_adversarial, m.inner_attack, m.iga, m.cacheable)
        for m in METHODS.values()
    }
    assert flags == {
        "st": (False, False, False, False, False),
        "kd": (True, False, False, False, True),
        "ard": (True, False, True, False, True),
        "kdiga": (True, False, False, True, True),
        "kdiga_ardc": (True, False, True, True, True),
        "kdiga_arda": (True, True, True, True, False),
        "rslad": (True, False, True, False, True),
        "adaad": (True, True, True, False, False),
        "iad": (True, True, True, False, False),
        "igdm": (True, True, True, False, False),
    }


def test_settings_missing_section_key_raises():
    with pytest.raises(ValueError, match=r"'iga'.*kdiga"):
        get_method("kdiga").settings({k: v for k, v in DISTILL.items() if k != "iga"})
    with pytest.raises(ValueError, match=r"distill.rslad has no 'adv_weight'"):
        get_method("rslad").settings({**DISTILL, "rslad": {}})


# ----------------------------------------------------------------------------- registry


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown method 'kdigaa'") as err:
        get_method("kdigaa")
    assert all(name in str(err.value) for name in METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        unregister("kdigaa")
    with pytest.raises(ValueError, match=r"at.*trades") as err:
        build_loss("kdigaa")
    assert all(name in str(err.value) for name in METHODS)


@pytest.mark.parametrize(
    ("name", "needle"),
    [("kd", "already registered"), ("rslad", "already registered"), ("at", "teacher-training")],
)
def test_register_refuses_a_taken_name(name, needle):
    with pytest.raises(ValueError, match=needle):
        register(dataclasses.replace(KD, name=name))


def test_register_refuses_what_is_not_a_method():
    with pytest.raises(ValueError, match="Method"):
        register({"name": "x"})


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"name": "Bad-Name"}, "lower case"),
        ({"name": ""}, "lower case"),
        ({"label": " "}, "label"),
        ({"description": "two\nlines"}, "description"),
        ({"loss": nn.Module}, "DistillLoss subclass"),
        ({"loss": "kd"}, "DistillLoss subclass"),
        ({"needs_teacher": 1}, "needs_teacher must be a bool"),
        ({"param_keys": ["ce_weight"]}, "tuple"),
        ({"param_keys": ("ce_weight", "ce_weight")}, "repeats"),
        ({"param_keys": ("ce_weight", "beta")}, "unknown param_keys.*beta"),
        ({"iga": True}, "iga=True.*'iga'"),
        ({"param_keys": ("adversarial",)}, "inner_attack=False.*'adversarial'"),
        ({"teacher_at_adversarial": True}, "teacher_at_adversarial"),
    ],
)
def test_bad_entry_raises(change, needle):
    with pytest.raises(ValueError, match=needle):
        dataclasses.replace(KD, **{"name": "kd_bad", **change})
    assert "kd_bad" not in METHODS


@pytest.mark.parametrize("name", ["kdiga", "kdiga_ardc", "kdiga_arda"])
def test_a_loss_reads_its_flags_from_its_entry(registered, name):
    """KDIGALoss serves three entries and branches on their flags, never on a name: the same
    entry under another name computes the same loss, and needs what its entry says."""
    original = get_method(name)
    entry = registered(dataclasses.replace(original, name=f"{name}_again", label="again"))
    settings = original.settings(DISTILL)
    student, teacher = mlp(0), mlp(1)
    x, y = batch()
    got, want = (
        _seeded(build_loss(n, **settings), student, teacher, x, y) for n in (entry.name, name)
    )
    assert got.keys() == want.keys()
    for part in want:
        torch.testing.assert_close(got[part], want[part])
    loss = build_loss(entry.name, **settings)
    assert loss.requires_teacher and loss.accepts_teacher_cache == original.cacheable


def _seeded(loss, student, teacher, x, y) -> dict:
    torch.manual_seed(0)  # the inner attack's random start
    return loss(student, teacher, x, y)


def test_register_and_unregister(registered):
    entry = registered(dataclasses.replace(KD, name="kd_tmp", label="KD tmp"))
    assert method_names()[-1] == "kd_tmp"
    assert get_method("kd_tmp") is entry
    assert unregister("kd_tmp") is entry
    assert "kd_tmp" not in METHODS and "kd_tmp" not in loss_names()
    with pytest.raises(ValueError, match="unknown loss method 'kd_tmp'"):
        build_loss("kd_tmp")


class _HalfKD(KDLoss):
    """KD with its loss halved: a loss class the losses module does not know."""

    def _compute(self, student, teacher, x, y, teacher_out):
        parts = super()._compute(student, teacher, x, y, teacher_out)
        return {**parts, "loss": parts["loss"] / 2}


def test_a_new_method_is_one_entry(registered):
    registered(
        Method(
            name="half_kd",
            label="KD/2",
            description="Half of KD (eq. 1).",
            loss=_HalfKD,
            needs_teacher=True,
            teacher_at_adversarial=False,
            inner_attack=False,
            iga=False,
            param_keys=("ce_weight", "kl_weight", "temperature"),
        )
    )
    assert "half_kd" in loss_names()
    assert allowed_keys("half_kd") == ("ce_weight", "kl_weight", "temperature")
    settings = get_method("half_kd").settings(DISTILL)
    loss = build_loss("half_kd", **settings)
    assert isinstance(loss, DistillLoss) and loss.method.name == "half_kd"
    assert loss.config_dict() == settings
    student, teacher = mlp(0), mlp(1)
    x, y = batch()
    want = build_loss("kd", **settings)(student, teacher, x, y)["loss"] / 2
    torch.testing.assert_close(loss(student, teacher, x, y)["loss"], want)
    with pytest.raises(ValueError, match="unknown setting 'iga_weight'"):
        build_loss("half_kd", iga_weight=1.0)
