"""params.yaml validation: one clear message naming key, value and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.params import (
    METHODS,
    ParamError,
    check_paths,
    parse_radius,
    radius_label,
    read_yaml,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
RAW = read_yaml(ROOT / "params.yaml")


def _set(raw: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(raw)
    node = out
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return out


def test_default_and_presets_are_valid():
    for path in ["params.yaml", "configs/cifar10.yaml", "configs/imagenet.yaml"]:
        validate(read_yaml(ROOT / path))


def test_pipeline_methods_are_kdiga_methods():
    from kdiga.losses import METHODS as CORE

    assert set(METHODS) <= set(CORE)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("distill.methods", ["kd", "kdgia"], "allowed: st, kd, ard, kdiga"),
        ("distill.students", ["resnet9000"], "allowed: "),
        ("attack.attacks", ["fgsm"], "allowed: pgd, autoattack"),
        ("shard.dataset", "mnist", "allowed: digits, cifar10"),
        ("attack.radii", [8], "did you mean 8/255?"),
        ("attack.radii", [0.1, 0.05], "increasing order"),
        ("attack.radii", [], "non-empty list"),
        ("attack.radii", [-0.1], "(0, 1]"),
        ("attack.radii", ["eight"], "e.g. 0.03 or 8/255"),
        ("distill.epochs", -1, "integer >= 0"),
        ("distill.iga.weight", -1.0, ">= 0"),
        ("distill.iga.reduction", "sum", "per_sample_mean, batch_frobenius"),
        ("distill.temperature", 0, "> 0"),
        ("distill.milestones", [15, 10], "increasing"),
        ("teacher.source", "hub:resnet", "train, file:, url:, timm:"),
        ("teacher.sha256", "abc", "64 lowercase hex"),
        ("distill.bogus", 1, "known keys"),
        ("signals.views", 0, "integer >= 1"),
        ("signals.grad_dtype", "int8", "float32, float16, bfloat16"),
        ("signals.schedule", "shuffle", "cycle, random"),
        ("signals.enabled", "yes", "true or false"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, expected):
    with pytest.raises(ParamError) as info:
        validate(_set(RAW, key, value))
    msg = str(info.value)
    assert key.split(".")[0] in msg and expected in msg


@pytest.mark.parametrize(("augment", "padding"), [("none", 2), ("crop", 0)])
def test_signal_views_need_an_augmentation(augment, padding):
    raw = _set(_set(RAW, "signals.enabled", True), "signals.views", 4)
    raw = _set(_set(raw, "distill.augment", augment), "distill.crop_padding", padding)
    with pytest.raises(ParamError, match=r"signals\.views = 4 .*use views: 1"):
        validate(raw)
    validate(_set(raw, "signals.views", 1))  # one view, the image itself: fine
    validate(_set(raw, "signals.enabled", False))  # off: the views setting is not used


def test_url_teacher_needs_sha256():
    raw = _set(RAW, "teacher.source", "url:https://example.org/w.pt")
    with pytest.raises(ParamError, match="sha256"):
        validate(raw)


def test_missing_dataset_root_and_teacher_file_are_named(tmp_path):
    raw = _set(RAW, "shard.dataset", "cifar10")
    raw = _set(raw, "shard.root", str(tmp_path / "nowhere"))
    params = validate(raw)  # the schema passes: presets must dry-run without their data
    with pytest.raises(ParamError, match=r"shard\.root.*does not exist"):
        check_paths(params)
    raw = _set(RAW, "teacher.source", f"file:{tmp_path / 'missing.pt'}")
    with pytest.raises(ParamError, match=r"teacher\.source.*does not exist"):
        check_paths(validate(raw))


@pytest.mark.parametrize(
    ("text", "value"), [("8/255", 8 / 255), (0.1, 0.1), ("1/255", 1 / 255), (1, 1.0)]
)
def test_radius_parsing(text, value):
    assert parse_radius("r", text) == pytest.approx(value)


def test_radius_labels_round_trip():
    assert radius_label(8 / 255) == "8/255"
    assert radius_label(0.1) == "0.1"


# Paths to every leaf of the default params, and values no leaf accepts.
def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1]


def _get(raw: dict, dotted: str):
    for part in dotted.split("."):
        raw = raw[part]
    return raw


# Leaves whose default is null are optional (null is valid there); kwargs take any mapping.
LEAVES = [
    k
    for k in _leaves(RAW)
    if _get(RAW, k) is not None
    and k not in {"distill.student_kwargs", "teacher.arch_kwargs", "teacher.arch"}
]
BAD = st.one_of(
    st.just(None),
    st.just("nonsense"),
    st.just(-3),
    st.just(float("nan")),
    st.just([]),
    st.just({"x": 1}),
    st.just(True),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(LEAVES), value=BAD)
def test_malformed_params_get_one_clear_error(key, value):
    """Any leaf set to a wrong-typed or out-of-range value: a ParamError naming that key."""
    if key.endswith("milestones") and value == []:
        return  # no milestones is valid: a constant learning rate
    if value is None and (key.startswith("attack.autoattack.n_") or key == "shard.test_samples"):
        return  # null keeps AutoAttack's own setting / evaluates every test image
    if value is True and key == "signals.enabled":
        return  # a boolean switch
    raw = _set(RAW, key, value)
    try:
        validate(raw)
    except ParamError as err:
        assert err.key.split("[")[0].startswith(key) or key.startswith(err.key.split("[")[0])
        assert "allowed" in str(err) or "expected" in str(err) or "must" in str(err)
    else:
        pytest.fail(f"{key}={value!r} was accepted")


def test_cli_bad_params_exit_2_without_traceback(tmp_path):
    bad = _set(RAW, "attack.radii", [8])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "--params", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 8/255?" in proc.stderr
    assert "Traceback" not in proc.stderr
