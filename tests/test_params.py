"""params.yaml validation: one clear message naming key, value and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import (
    ParamError,
    check_models,
    check_paths,
    describe,
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


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("distill.methods", ["kd", "kdgia"], "allowed: st, kd, ard, kdiga"),
        ("students.small_cnn.arch", "resnet9000", "allowed: "),
        ("students.small_cnn.init", "imagenet", "allowed: scratch, pretrained"),
        ("students.small_cnn.lr", 0, "> 0"),
        ("seeds", [0, 0], "unique"),
        ("seeds", [-1], "integer >= 0"),
        ("distill.rslad.adv_weight", 1.5, "[0, 1]"),
        ("report.claim_radius", 0.3, "must be one of attack.radii"),
        ("attack.attacks", ["fgsm"], "allowed: pgd, autoattack"),
        ("shard.dataset", "mnist", "allowed: digits, cifar10"),
        ("attack.radii", [8], "did you mean 8/255?"),
        ("attack.radii", [0.1, 0.05], "increasing order"),
        ("attack.radii", [], "non-empty list"),
        ("attack.radii", [-0.1], "(0, 1]"),
        ("attack.radii", ["eight"], "e.g. 0.03 or 8/255"),
        ("distill.epochs", -1, "integer >= 1"),
        ("distill.iga.weight", -1.0, ">= 0"),
        ("distill.iga.reduction", "sum", "per_sample_mean, batch_frobenius"),
        ("distill.temperature", 0, "> 0"),
        ("distill.milestones", [15, 10], "increasing"),
        ("teachers.pgdat.source", "hub:resnet", "train, file:, url:, timm:"),
        ("teachers.pgdat.sha256", "abc", "64 lowercase hex"),
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
    assert msg.startswith(f"params: {key}") and expected in msg


@pytest.mark.parametrize(("augment", "padding"), [("none", 2), ("crop", 0)])
def test_signal_views_need_an_augmentation(augment, padding):
    raw = _set(_set(RAW, "signals.enabled", True), "signals.views", 4)
    raw = _set(_set(raw, "distill.augment", augment), "distill.crop_padding", padding)
    with pytest.raises(ParamError, match=r"signals\.views = 4 .*use views: 1"):
        validate(raw)
    validate(_set(raw, "signals.views", 1))  # one view, the image itself: fine
    validate(_set(raw, "signals.enabled", False))  # off: the views setting is not used


def test_url_teacher_needs_sha256():
    raw = _set(RAW, "teachers.pgdat.source", "url:https://example.org/w.pt")
    with pytest.raises(ParamError, match="sha256"):
        validate(raw)


def test_missing_dataset_root_and_teacher_file_are_named(tmp_path):
    raw = _set(RAW, "shard.dataset", "cifar10")
    raw = _set(raw, "shard.root", str(tmp_path / "nowhere"))
    params = validate(raw)  # the schema passes: presets must dry-run without their data
    with pytest.raises(ParamError, match=r"shard\.root.*does not exist"):
        check_paths(params)
    raw = _set(RAW, "teachers.pgdat.source", f"file:{tmp_path / 'missing.pt'}")
    with pytest.raises(ParamError, match=r"teachers\.pgdat\.source.*does not exist"):
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
    and not k.endswith(("kwargs", "teachers.pgdat.arch", "teachers.trades.arch"))
]
BAD = [None, "nonsense", -3, float("nan"), [], {"x": 1}, True]


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_malformed_params_get_one_clear_error(value):
    """Every leaf set to each wrong-typed or out-of-range value: a ParamError naming that key.

    Exhaustive rather than sampled: 75 leaves x 7 values validate in a few seconds, and a
    sample once missed a new boolean key.
    """
    accepted = []
    for key in LEAVES:
        if key.endswith("milestones") and value == []:
            continue  # no milestones is valid: a constant learning rate
        if value is None and (
            key.startswith("attack.autoattack.n_") or key == "shard.test_samples"
        ):
            continue  # null keeps AutoAttack's own setting / evaluates every test image
        if value is True and isinstance(_get(RAW, key), bool):
            continue  # a boolean switch (signals.enabled, attack.compile, ...)
        raw = _set(RAW, key, value)
        try:
            validate(raw)
        except ParamError as err:
            assert err.key.split("[")[0].startswith(key) or key.startswith(err.key.split("[")[0]), (
                key,
                err.key,
            )
            assert "allowed" in str(err) or "expected" in str(err) or "must" in str(err), str(err)
        else:
            accepted.append(key)
    assert not accepted, f"{value!r} was accepted for {accepted}"


def test_cli_bad_params_exit_2_without_traceback(tmp_path):
    bad = _set(RAW, "attack.radii", [8])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages", "report", "--params", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 8/255?" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the hostile pass: each case stops at validation with one line a user can act on ------


def _message(raw) -> str:
    with pytest.raises(ParamError) as info:
        validate(raw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _file_message(tmp_path, data: bytes, name: str = "params.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ParamError) as info:
        read_yaml(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "seed: 0\ndistill:\n  epochs: 3\n  lr: 0.1\n  epochs: 40\n",
            "key 'epochs' is given twice (lines 3 and 5) in distill",
        ),
        (
            "seed: 0\nshard: {}\nseed: 1\n",
            "key 'seed' is given twice (lines 1 and 3) at the top level",
        ),
        (
            "distill:\n  iga: {weight: 1, weight: 2}\n",
            "key 'weight' is given twice (line 2) in distill.iga",
        ),
        ("a:\n  - {x: 1}\n  - x: 1\n    x: 2\n", "key 'x' is given twice (lines 3 and 4) in a[1]"),
    ],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, expected):
    assert expected in _file_message(tmp_path, text.encode())


def test_the_default_params_file_gives_no_key_twice_and_merge_keys_still_work(tmp_path):
    read_yaml(ROOT / "params.yaml")
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_yaml(path) == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}}
    path.write_text("a: &x\n  p: 1\n  <<: {p: 5, q: 2}\n<<: *x\nb: 1\n")  # merged merges
    assert read_yaml(path) == yaml.safe_load(path.read_text())


def test_bytes_that_are_not_utf8_name_the_file_and_the_offset(tmp_path):
    msg = _file_message(tmp_path, b"seed: 0\n# caf" + b"\xe9\n")
    assert "byte 13 (line 2, 0xe9) is not UTF-8: the file must be UTF-8 text" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1,\nb: 2\n", "it is not valid YAML (while parsing a flow sequence at line 1"),
        ("a: b: c\n", "it is not valid YAML (mapping values are not allowed here at line 1"),
        ("a: 1\nb: \x01\n", "it is not valid YAML (character #x0001 on line 2"),
    ],
)
def test_invalid_yaml_is_one_line_naming_the_file(tmp_path, text, expected):
    assert expected in _file_message(tmp_path, text.encode())


@pytest.mark.parametrize("text", ["1e12", "1.0e12", "1000000000000", "1.0e+12"])
def test_a_huge_epoch_count_is_refused_however_yaml_reads_it(text):
    value = yaml.safe_load(f"v: {text}")["v"]  # a str, a str, an int, a float
    for key in ("distill.epochs", "teachers.pgdat.train.epochs"):
        msg = _message(_set(RAW, key, value))
        assert f"params: {key} = " in msg and "expected an integer >= 1 and <= 10000" in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("shard.seed", 2**32, "expected an integer >= 0 and <= 2**32 - 1"),
        ("shard.seed", -1, "expected an integer >= 0 and <= 2**32 - 1"),
        ("distill.epochs", "1e12", "(YAML reads 1e12 as text, not a number: write the digits)"),
        ("distill.epochs", 20.0, "(20.0 is a float, not an integer)"),
        ("teachers.pgdat.train.steps", 10**6, "expected an integer >= 1 and <= 100000"),
        ("distill.adversarial.steps", 10**6, "expected an integer >= 1 and <= 100000"),
        ("attack.pgd.steps", 10**6, "expected an integer >= 1 and <= 100000"),
        ("attack.pgd.restarts", 10**4, "expected an integer >= 1 and <= 1000"),
        ("attack.autoattack.n_iter", 10**6, "expected an integer >= 1 and <= 100000"),
        ("attack.autoattack.n_restarts", 10**4, "expected an integer >= 1 and <= 1000"),
        ("attack.autoattack.n_target_classes", 10, "at most 9: digits has 10 classes"),
        ("bounds.steps", 10**6, "expected an integer >= 0 and <= 100000"),
        ("bounds.restarts", 10**4, "expected an integer >= 1 and <= 1000"),
        ("distill.batch_size", 2**20 + 1, "expected an integer >= 1 and <= 1048576"),
        ("teachers.pgdat.train.batch_size", 2**30, "expected an integer >= 1 and <= 1048576"),
        ("attack.batch_size", 2**30, "expected an integer >= 1 and <= 1048576"),
        ("bounds.batch_size", 2**30, "expected an integer >= 1 and <= 1048576"),
        ("signals.batch_size", 2**30, "expected an integer >= 1 and <= 1048576"),
        ("signals.views", 1025, "expected an integer >= 1 and <= 1024"),
        ("distill.momentum", 1.5, "momentum must be in [0, 1)"),
        ("teachers.pgdat.train.momentum", 1, "momentum must be in [0, 1)"),
        (
            "shard.val_fraction",
            0.0,
            "expected a fraction in (0, 1), e.g. 0.1: the validation split",
        ),
        ("shard.val_fraction", 1.0, "attack.split: val, python -m pipeline.tune"),
        (
            "distill.crop_padding",
            16,
            "with distill.augment crop the padding must be less than shard.image_size (16)",
        ),
        (
            "teachers.pgdat.train.crop_padding",
            99,
            "padding must be less than shard.image_size (16)",
        ),
    ],
)
def test_out_of_range_values_name_key_and_range(key, value, expected):
    msg = _message(_set(RAW, key, value))
    assert msg.startswith(f"params: {key} = {value!r} is not allowed; ") and expected in msg


def test_range_edges_are_accepted():
    for key, value in [
        ("shard.seed", 2**32 - 1),
        ("distill.epochs", 10_000),
        ("distill.momentum", 0.0),
        ("shard.val_fraction", 0.5),
        ("distill.crop_padding", 15),
        ("attack.autoattack.n_target_classes", 9),
    ]:
        validate(_set(RAW, key, value))
    # padding is only cut when the section crops
    validate(_set(_set(RAW, "distill.augment", "none"), "distill.crop_padding", 64))


@pytest.mark.parametrize(
    ("dataset", "mean", "std", "key", "expected"),
    [
        (
            "digits",
            [0.5],
            [0.0],
            "teachers.pgdat.std[0] = 0.0",
            "std entries must be finite numbers > 0",
        ),
        (
            "digits",
            [0.5],
            [-0.2],
            "teachers.pgdat.std[0] = -0.2",
            "std entries must be finite numbers > 0",
        ),
        (
            "digits",
            [0.5],
            None,
            "teachers.pgdat.std = None",
            "teachers.pgdat.mean is given, so std must be too",
        ),
        (
            "digits",
            None,
            [0.5],
            "teachers.pgdat.mean = None",
            "teachers.pgdat.std is given, so mean must be too",
        ),
        (
            "digits",
            [0.5] * 3,
            [0.2] * 3,
            "teachers.pgdat.mean",
            "expected 1 value: digits images have 1",
        ),
        (
            "cifar10",
            [0.5] * 2,
            [0.2] * 2,
            "teachers.pgdat.mean",
            "expected 1 or 3 values: cifar10 images",
        ),
        (
            "synthetic",
            [0.5] * 4,
            [0.2] * 4,
            "teachers.pgdat.mean",
            "expected 1 or 3 values: synthetic",
        ),
        ("cifar10", [0.5] * 3, [0.2], "teachers.pgdat.std = [0.2]", "teachers.pgdat.mean has 3"),
    ],
)
def test_normalisation_stats_fit_the_dataset(dataset, mean, std, key, expected):
    raw = _set(_set(RAW, "shard.dataset", dataset), "shard.root", "/nowhere")
    raw = _set(_set(raw, "teachers.pgdat.mean", mean), "teachers.pgdat.std", std)
    msg = _message(raw)
    assert f"params: {key}" in msg and expected in msg


def test_normalisation_stats_of_one_or_all_channels_are_accepted():
    raw = _set(_set(RAW, "shard.dataset", "cifar10"), "shard.root", "/nowhere")
    validate(_set(_set(raw, "teachers.pgdat.mean", [0.5] * 3), "teachers.pgdat.std", [0.25] * 3))
    validate(_set(_set(raw, "teachers.pgdat.mean", [0.5]), "teachers.pgdat.std", [0.25]))


@pytest.mark.parametrize(
    ("key", "kwargs", "expected"),
    [
        ("students.small_cnn.kwargs", {"depth": 3}, "unexpected keyword argument 'depth'"),
        ("students.small_cnn.kwargs", {"width": "wide"}, "building small_cnn for digits fails: "),
        ("students.small_cnn.kwargs", {"width": -3}, "width must be >= 1, got -3"),
        ("students.small_cnn.kwargs", {"in_chans": 3}, "multiple values for keyword argument"),
        ("teachers.pgdat.arch_kwargs", {"width": 0}, "width must be >= 1, got 0"),
        ("teachers.pgdat.arch_kwargs", {"bogus": 1}, "unexpected keyword argument 'bogus'"),
    ],
)
def test_bad_model_kwargs_are_refused_at_validation(key, kwargs, expected):
    msg = _message(_set(RAW, key, kwargs))
    assert msg.startswith(f"params: {key} = {kwargs!r} is not allowed; ") and expected in msg


@pytest.mark.parametrize("key", ["students.small_cnn.kwargs", "teachers.pgdat.arch_kwargs"])
@pytest.mark.parametrize("bad", ["pretrained", "weights"])
def test_pretrained_weights_are_no_build_kwarg(key, bad):
    msg = _message(_set(RAW, key, {bad: True}))
    assert (
        f"params: {key}.{bad} = True" in msg and "pretrained weights are not a build option" in msg
    )


def test_an_architecture_that_cannot_take_the_data_is_named():
    msg = _message(_set(RAW, "students.resnet", {"arch": "torchvision:resnet18"}))
    assert "params: students.resnet.arch = 'torchvision:resnet18'" in msg
    assert "torchvision models take 3 input channels" in msg


def test_the_teacher_arch_is_only_built_when_given():
    raw = _set(_set(RAW, "teachers.pgdat.source", "timm:resnet18"), "teachers.pgdat.arch", None)
    validate(
        _set(raw, "teachers.pgdat.arch_kwargs", {"drop_rate": 0.1})
    )  # timm's, not checked here


def test_model_checks_use_no_network_and_no_memory(monkeypatch):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise AssertionError("validation opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    raw = _set(_set(RAW, "shard.dataset", "cifar10"), "shard.root", "/nowhere")
    raw = _set(raw, "shard.image_size", 32)
    raw = _set(
        _set(raw, "teachers.pgdat.arch", "wrn_34_10"), "students.small_cnn.arch", "mobilenet_v2"
    )
    validate(raw)  # warm: the imports
    start = time.perf_counter()
    validate(raw)
    assert time.perf_counter() - start < 1.0  # a 46M-parameter teacher, built on "meta"
    pytest.importorskip("timm")
    validate(_set(raw, "students.small_cnn.arch", "timm:resnet18"))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "url:http://example.org/w.pt",
            "plain http is not allowed: use url:https://..., or "
            "download the file and use file:<path>",
        ),
        ("url:ftp://example.org/w.pt", "allowed: url:https://<host>/<file> or url:file://<path>"),
        ("url:https://", "allowed: url:https://<host>/<file> or url:file://<path>"),
    ],
)
def test_url_teachers_are_https_or_file_urls(source, expected):
    raw = _set(_set(RAW, "teachers.pgdat.source", source), "teachers.pgdat.sha256", "0" * 64)
    msg = _message(raw)
    assert (
        msg.startswith(f"params: teachers.pgdat.source = {source!r} is not allowed; ")
        and expected in msg
    )
    for ok in ("url:https://example.org/w.pt", "url:file:///mirror/w.pt"):
        validate(_set(raw, "teachers.pgdat.source", ok))


# -- the grid: teachers, students, seeds; defaults; typed settings ---------------------------


def test_omitted_keys_take_their_declared_defaults():
    raw = {
        "teachers": {"t": {"arch": "small_cnn"}},
        "students": {"s": {"arch": "small_cnn"}},
        "distill": {"methods": ["st", "kd"]},
    }
    p = validate(raw)
    assert p.seeds == [0] and p.shard.dataset == "digits" and p.teachers["t"].source == "train"
    assert p.teachers["t"].train.method == "at" and p.students["s"].init == "scratch"
    assert p.distill.iga.reduction == "per_sample_mean" and p.attack.pgd.steps == 20
    defaults = {k: d for k, d, _ in describe()}
    assert defaults["distill.iga.weight"] == "1.0" and defaults["students.<name>.arch"] == (
        "(required)"
    )
    assert all(doc for _, _, doc in describe())  # every key says what it is


@pytest.mark.parametrize(
    ("raw", "key", "expected"),
    [
        ({"students": {"s": {"arch": "small_cnn"}}}, "distill.methods", "this key is required"),
        ({"students": {"s": {}}, "distill": {"methods": ["st"]}}, "students.s.arch", "required"),
        ({"students": {}, "distill": {"methods": ["st"]}}, "students", "at least one student"),
        (
            {"students": {"s": {"arch": "small_cnn"}}, "distill": {"methods": ["kd"]}},
            "teachers",
            "need a teacher",
        ),
        (
            {"students": {"a--b": {"arch": "small_cnn"}}, "distill": {"methods": ["st"]}},
            "students.a--b",
            "single '-'",
        ),
        (
            {"students": {"s/x": {"arch": "small_cnn"}}, "distill": {"methods": ["st"]}},
            "students.s/x",
            "letters, digits",
        ),
        (
            {
                "students": {"s": {"arch": "small_cnn", "init": "pretrained"}},
                "distill": {"methods": ["st"]},
            },
            "students.s.init",
            "timm or torchvision",
        ),
    ],
)
def test_grid_mistakes_are_named(raw, key, expected):
    msg = _message({"teachers": {}, **raw})
    assert msg.startswith(f"params: {key}") and expected in msg


def test_a_pretrained_or_file_student_is_accepted_and_its_file_checked(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["students"]["vit"] = {"arch": "timm:resnet18", "init": "pretrained", "lr": 1e-5}
    raw["shard"] = {**raw["shard"], "dataset": "synthetic"}
    p = validate(raw)
    assert p.train_settings("vit")["lr"] == 1e-5 and p.train_settings("small_cnn")["lr"] == 0.05
    raw = _set(RAW, "students.small_cnn.init", f"file:{tmp_path / 'nope.safetensors'}")
    with pytest.raises(ParamError, match=r"students\.small_cnn\.init.*does not exist"):
        check_paths(validate(raw))


def test_study_values_are_plain_data_for_provenance():
    p = validate(RAW)
    assert p.value("teachers.pgdat.train.eps") == 0.1
    assert p.value("distill.iga") == {
        "weight": 1.0,
        "reduction": "per_sample_mean",
        "grad_mode": "train",
    }
    assert p.value("students.small_cnn")["init"] == "scratch"


def test_models_are_built_only_when_asked():
    """validate(build=False), for the DAG and the hand-offs, skips the model builds; the same
    bad kwargs is refused by check_models with the message validate gives."""
    raw = _set(RAW, "students.small_cnn.kwargs", {"depth": 3})
    study = validate(raw, build=False)
    with pytest.raises(ParamError) as info:
        check_models(study)
    assert str(info.value) == _message(raw)
    assert "unexpected keyword argument 'depth'" in str(info.value)
