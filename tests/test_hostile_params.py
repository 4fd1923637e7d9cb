"""Hostile params and CLIs: each case gets one clear line (what is wrong and what is allowed),
a refusal, or a warning where the setting is allowed but changes less than it seems."""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from tiny_study import ROOT, TINY, env

from pipeline import dag, gpu
from pipeline.params import (
    MAX_EPOCHS,
    MAX_PARAMS_BYTES,
    SEED_MAX,
    ParamError,
    check_train_shards,
    parse_student_id,
    read_yaml,
    student_ids,
    val_fraction_problem,
    validate,
)
from pipeline.stages import common, report

RAW = read_yaml(ROOT / "params.yaml")


def _set(raw: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(raw)
    node = out
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def _refused(raw) -> str:
    """validate's one-line message for ``raw``."""
    with pytest.raises(ParamError) as info:
        validate(raw, build=False)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    return msg


def _file_refused(path: Path) -> str:
    with pytest.raises(ParamError) as info:
        read_yaml(path)
    msg = str(info.value)
    assert msg.startswith(f"params: params file = {str(path)!r} is not allowed; "), msg
    assert "\n" not in msg and len(msg) < 1000, msg
    return msg


def _cli(*args: str, cwd: Path = ROOT, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env(PYTHONPATH=str(ROOT), **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# -- 1. YAML alias bombs, and values of unbounded size --------------------------------------


def _bomb(levels: int = 30) -> str:
    """A few hundred bytes of YAML aliases that stand for 2**levels strings."""
    lines = ['b0: &b0 ["xxxxxxxxxxxxxxxx"]']
    lines += [f"b{i}: &b{i} [*b{i - 1}, *b{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize(
    "where",
    [
        "{bomb}\n",  # under unknown keys
        "bomb:\n  {bomb_indented}\nstudents:\n  s:\n    arch: small_cnn\n    kwargs: {{x: *b29}}\n",
        "bomb:\n  {bomb_indented}\nshard:\n  root: *b29\n",
    ],
    ids=["unknown-key", "student-kwargs", "shard-root"],
)
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, where):
    text = where.format(bomb=_bomb(), bomb_indented=_bomb().replace("\n", "\n  "))
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert len(text) < 2000
    msg = _file_refused(path)
    assert "its aliases (*name) expand it to" in msg and "at most 100,000" in msg
    proc = _cli("pipeline.params", str(path))
    assert "its aliases (*name) expand it to" in _one_error_line(proc)


def test_a_merge_key_bomb_and_an_alias_inside_itself_are_refused(tmp_path):
    lines = ["m0: &m0 {a: 1, b: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}" for i in range(1, 70)]
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert "its aliases (*name) expand it to more than 10**18 values" in _file_refused(path)
    path.write_text("a: &a [1, *a]\n")
    assert "the value at line 1 holds itself (an alias inside its own anchor)" in _file_refused(
        path
    )


def test_a_long_text_named_by_many_aliases_is_refused(tmp_path):
    """Few values, but a 100 KB string named 10,000 times: a gigabyte once expanded."""
    lines = [f"s: &s {'x' * 100_000}", "a0: &a0 [" + ", ".join(["*s"] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 4)]
    path = tmp_path / "wide.yaml"
    path.write_text("\n".join(lines) + "\n")
    msg = _file_refused(path)
    expanded = 100_000 * 11_111 + 9  # the string at each of its uses, and the keys' text
    assert f"its aliases (*name) expand it to {expanded:,} characters of text; a params " in msg
    assert "file holds at most 4,194,304: write the values out" in msg


def test_aliases_a_params_file_uses_are_still_read(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("d: &d {epochs: 3}\ndistill:\n  <<: *d\n  lr: 0.1\nr: [*d, *d]\n")
    assert read_yaml(path)["distill"] == {"epochs": 3, "lr": 0.1}


def test_a_value_nested_deeper_than_a_params_file_needs_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "lists and mappings nest more than 64 deep at line 1" in _file_refused(path)


def test_a_number_of_a_hundred_thousand_digits_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("seeds: [" + "9" * 100_000 + "]\n")
    assert "the number at line 1 has 100,000 characters; a params number has at most 64" in (
        _file_refused(path)
    )


def test_error_messages_show_a_bounded_part_of_a_huge_value():
    huge = ["x" * 1000] * 10_000
    for raw in (_set(RAW, "bogus", huge), _set(RAW, "students.small_cnn.kwargs", {"w": huge})):
        with pytest.raises(ParamError) as info:
            validate(raw, build=True)
        assert len(str(info.value)) < 1000 and "..." in str(info.value)
    assert len(_refused(_set(RAW, "seeds", [10**5000]))) < 1000


def test_values_of_a_params_file_are_counted_with_each_alias_use():
    shared = list(range(1000))
    raw = _set(RAW, "bogus", [shared] * 200)  # 200,000 values held once each
    assert "the file holds more than 100,000 values" in _refused(raw)


# -- 2. only regular files, read bounded ----------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: Path("/dev/zero"), "it is a character device: a params file must be a regular"),
        (lambda p: (os.mkfifo(p / "fifo"), p / "fifo")[1], "it is a FIFO (named pipe)"),
        (lambda p: p, "it is a directory"),
        (lambda p: p / "missing.yaml", "the file does not exist"),
    ],
    ids=["device", "fifo", "directory", "missing"],
)
def test_a_params_file_must_be_a_regular_file(tmp_path, make, expected):
    path = make(tmp_path)
    assert expected in _file_refused(path)
    proc = _cli("pipeline.params", str(path))  # a FIFO would block an open() for its writer
    assert expected in _one_error_line(proc)


def test_a_params_file_over_1_mib_is_refused_with_its_size(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# padding\n" * (MAX_PARAMS_BYTES // 10) + b"seeds: [0]\n" * 3)
    size = path.stat().st_size
    msg = _file_refused(path)
    assert f"it is {size:,} bytes; a params file is at most 1,048,576 bytes (1 MiB)" in msg


# -- 3. seeds the code can use ----------------------------------------------------------------


def test_seeds_are_bounded_to_32_bits_and_the_largest_trains():
    from kdiga.data import _synthetic
    from kdiga.signals import view_params
    from kdiga.train import TrainConfig, fit
    from kdiga.train.rng import epoch_generators

    assert SEED_MAX == 2**32 - 1
    for key in ("seeds", "shard.seed", "teachers.pgdat.train.seed"):
        value = [2**32] if key == "seeds" else 2**32
        msg = _refused(_set(RAW, key, value))
        assert "expected an integer >= 0 and <= 2**32 - 1" in msg
        validate(_set(RAW, key, [SEED_MAX] if key == "seeds" else SEED_MAX), build=False)
    order, aug = epoch_generators(SEED_MAX, MAX_EPOCHS - 1)
    assert order.initial_seed() == SEED_MAX * 1000003 + MAX_EPOCHS - 1
    assert aug.initial_seed() == order.initial_seed() + 500009
    view_params(4, 1023, "crop", 2, seed=SEED_MAX)  # shard.seed's views, the largest view
    _synthetic("train", 4, 1, 2, 4, SEED_MAX)  # and its synthetic data
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 2
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    from kdiga.methods import build_loss

    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.1, seed=SEED_MAX, augment="crop")
    assert len(fit(model, build_loss("st"), x, y, cfg)) == 1
    assert epoch_generators(2**64, 0)[0].initial_seed() == 0  # any seed: the library wraps


# -- 4. numbers YAML 1.1 leaves as text -------------------------------------------------------


def test_numbers_yaml_reads_as_text_are_numbers_for_every_real_valued_key(tmp_path):
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    path.write_text(text.replace("    lr: 0.05", "    lr: 1e-5", 1))
    assert read_yaml(path)["teachers"]["pgdat"]["train"]["lr"] == "1e-5"  # what YAML 1.1 did
    p = validate(read_yaml(path), build=False)
    assert p.teachers["pgdat"].train.lr == 1e-5

    def leaves(node, at=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{at}{k}.")
            elif isinstance(v, float):
                yield f"{at}{k}", v

    floats = list(leaves(RAW))
    assert len(floats) > 10
    for key, value in floats:  # every real-valued key takes its own value as 1.0e-1 text
        p = validate(_set(RAW, key, f"{value:e}"), build=False)
        assert p.value(key) == pytest.approx(value), key
    raw = _set(RAW, "attack.radii", ["1e-2", "8/255"])
    raw = _set(_set(raw, "teachers.pgdat.mean", ["5e-1"]), "teachers.pgdat.std", ["2.5E-1"])
    raw = _set(raw, "report.claim_radius", None)
    p = validate(raw, build=False)
    assert p.attack.radii == [0.01, 8 / 255] and p.teachers["pgdat"].std == [0.25]
    for bad in ("1e-5x", "nan", "inf", "1e999"):
        assert "expected a finite number > 0.0" in _refused(_set(RAW, "distill.lr", bad))
    msg = _refused(_set(RAW, "distill.epochs", "1e3"))  # integer keys: digits, and say why
    assert "(YAML reads 1e3 as text, not a number: write the digits)" in msg


# -- 5. a validation cut that leaves a split empty -------------------------------------------


def test_a_val_fraction_that_empties_a_split_names_the_fractions_that_work():
    msg = _refused(_set(RAW, "shard.val_fraction", 0.0001))
    assert msg.startswith(
        "params: shard.val_fraction = 0.0001 is not allowed; digits: it leaves "
        "the validation split empty"
    )
    assert "use a fraction from 0.0041 to 0.9959" in msg
    assert "leaves the train split empty" in _refused(_set(RAW, "shard.val_fraction", 0.9999))
    for edge in (0.0041, 0.9959):
        validate(_set(RAW, "shard.val_fraction", edge), build=False)
    assert val_fraction_problem(0.004, [122]) and not val_fraction_problem(0.0041, [122])
    synthetic = _set(_set(RAW, "shard.dataset", "synthetic"), "shard.val_fraction", 0.009)
    assert "use a fraction from 0.0097 to" in _refused(synthetic)


def _jpeg_folder(root: Path, per_class: int = 4) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (16, 16), (80 * c, 40 * k, 100)).save(folder / f"{k}.JPEG")
    return root


def _folder_study(study: Path, images: Path, **shard) -> Path:
    params = {
        "shard": {
            "dataset": "imagenet",
            "root": str(images),
            "num_classes": 2,
            "image_size": 16,
            "val_fraction": 0.25,
            "test_samples": None,
            "max_per_shard": 100,
            "workers": 2,
        }
        | shard,
        "teachers": {
            "t": {
                "arch": "small_cnn",
                "arch_kwargs": {"width": 4},
                "train": {"epochs": 1, "batch_size": 2, "milestones": []},
            }
        },
        "students": {"s": {"arch": "small_cnn", "kwargs": {"width": 4}}},
        "distill": {"methods": ["st"]},
    }
    study.mkdir(exist_ok=True)
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    return study


@pytest.mark.slow
def test_an_image_folder_whose_cut_empties_a_split_stops_the_shard_stage(tmp_path):
    study = _folder_study(tmp_path / "study", _jpeg_folder(tmp_path / "images"), val_fraction=0.1)
    line = _one_error_line(_cli("pipeline.stages.shard", cwd=study))
    assert "params: shard.val_fraction = 0.1 is not allowed; " in line
    assert "train: it leaves the validation split empty" in line
    assert "use a fraction from 0.13 to 0.87" in line
    assert not (study / "data" / "shards").exists()


# -- 11. fewer train shards than DataLoader workers x ranks -----------------------------------


def test_fewer_train_shards_than_workers_times_ranks_names_both_and_the_fix():
    p = validate(_set(RAW, "shard.workers", 4), build=False)
    one_shard = {"shards": [{"count": 60}, {"count": 0}]}
    with pytest.raises(ParamError) as info:
        check_train_shards(p, one_shard, ranks=2)
    msg = str(info.value)
    assert "the train split is 1 shard(s), fewer than 2 rank(s) x 4 worker(s) = 8" in msg
    assert "use a smaller shard.max_per_shard (now 10000) and run the shard stage again" in msg
    with pytest.raises(ParamError, match=r"use shard.workers: 1 or fewer, or a smaller"):
        check_train_shards(p, {"shards": [{"count": 5}] * 3}, ranks=2)
    check_train_shards(p, {"shards": [{"count": 5}] * 8}, ranks=2)


def test_the_stream_refuses_a_layout_with_a_project_error():
    from kdiga.shards import ShardError
    from kdiga.stream.plan import plan_epoch

    with pytest.raises(ShardError, match="training needs at least world_size x max"):
        plan_epoch([10], train=True, batch_size=2, world_size=1, workers=2, seed=0, epoch=0)


@pytest.mark.slow
def test_a_teacher_streamed_from_too_few_shards_stops_with_one_line(tmp_path):
    study = _folder_study(tmp_path / "study", _jpeg_folder(tmp_path / "images"), workers=3)
    assert _cli("pipeline.stages.shard", cwd=study).returncode == 0
    line = _one_error_line(_cli("pipeline.stages.teacher", "--teacher", "t", cwd=study))
    assert "params: shard.workers = 3 is not allowed; the train split is 1 shard(s), fewer " in line
    assert "than 1 rank(s) x 3 worker(s) = 3" in line


# -- 6. values that are not plain YAML ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("2024-01-01", "a YAML date is not a plain value"),
        ("2024-01-01 10:00:00", "a YAML timestamp is not a plain value"),
        ("!!binary aGVsbG8=", "YAML binary data (!!binary) is not a plain value"),
        ("!!set {a, b}", "a YAML set (!!set) is not a plain value"),
        ("!!omap [a: 1]", "YAML pairs (!!omap or !!pairs) is not a plain value"),
    ],
)
def test_a_value_that_is_not_plain_yaml_names_the_key_and_its_type(tmp_path, value, kind):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("  root: null", f"  root: {value}"))
    msg = _refused(read_yaml(path))
    assert msg.startswith("params: shard.root") and kind in msg and "quote" in msg
    assert kind in _one_error_line(_cli("pipeline.params", str(path)))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("shard.root", 7, "expected a path, as text"),
        ("shard.root", " ", "expected a path, as text"),
        ("students.small_cnn.arch", "timm:", "name the model: timm:<model name>"),
        ("teachers.pgdat.source", "file:", "name the checkpoint's path: file:<path>"),
        ("teachers.pgdat.source", "timm:", "name a model: timm:<name>"),
        ("students.small_cnn.init", "file:", "name the checkpoint's path: file:<path>"),
    ],
)
def test_a_path_or_a_name_left_empty_is_refused(key, value, expected):
    msg = _refused(_set(RAW, key, value))
    assert msg == f"params: {key} = {value!r} is not allowed; {expected}"


def test_mapping_keys_must_be_text():
    msg = _refused(_set(RAW, "students.small_cnn.kwargs", {1: 2}))
    assert "params: students.small_cnn.kwargs.1 = 2 is not allowed; a key must be text" in msg


# -- 7. environment variables -----------------------------------------------------------------


@pytest.mark.parametrize("lock_dir", ["/etc/passwd", "/proc/self"])
def test_a_lock_dir_that_cannot_hold_locks_names_the_variable(monkeypatch, lock_dir):
    monkeypatch.setenv("KDIGA_GPU_LOCK_DIR", lock_dir)
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("KDIGA_GPU_HELD", raising=False)
    with pytest.raises(gpu.GpuSlotsError) as info, gpu.gpu_slot():
        pass
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"KDIGA_GPU_LOCK_DIR={lock_dir!r}: cannot keep GPU lock files there (")
    assert "expected a directory" in msg


def _stage(tmp_path, monkeypatch, body, argv=(), stage="report", add=None) -> int:
    """common.run of ``stage`` with ``body``, in a directory holding the tiny params."""
    monkeypatch.chdir(tmp_path)
    if not (tmp_path / "params.yaml").exists():
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    threads = torch.get_num_threads()
    try:
        return common.run(stage, "test", body, list(argv), add)
    finally:
        torch.set_num_threads(threads)


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if " ERROR " in line]
    assert len(lines) == 1, err
    return lines[0]


def test_a_gpu_slot_cuda_cannot_see_stops_the_job_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "1")
    monkeypatch.setenv("KDIGA_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("KDIGA_GPU_HELD", raising=False)
    monkeypatch.setattr("pipeline.gpu.cuda.device_count", lambda: 0)  # as on a machine without CUDA

    def body(args, params):
        with common.device():
            raise AssertionError("not reached")

    assert _stage(tmp_path, monkeypatch, body) == 2
    line = _error_line(capsys.readouterr().err)
    assert "report failed: KDIGA_GPU_SLOTS='1' gives this job GPU 0, but CUDA sees no such " in line
    assert "allowed: KDIGA_GPU_SLOTS=0 to run on the CPU" in line


def test_a_bad_log_level_names_the_variable_and_the_levels(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDIGA_LOG_LEVEL", "bogus")
    assert _stage(tmp_path, monkeypatch, lambda a, p: None) == 2
    line = _error_line(capsys.readouterr().err)
    assert "KDIGA_LOG_LEVEL = 'bogus' is not allowed; allowed: DEBUG, INFO, WARNING, ERROR" in line
    monkeypatch.setenv("KDIGA_LOG_LEVEL", "warning")  # any case
    assert _stage(tmp_path, monkeypatch, lambda a, p: None) == 0


# -- 8. CLI arguments -------------------------------------------------------------------------


def test_a_log_that_is_a_directory_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "logs").mkdir()
    assert _stage(tmp_path, monkeypatch, lambda a, p: None, ["--log", "logs"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--log = 'logs' is not allowed; it is a directory: give a file" in line
    (tmp_path / "file").write_text("")
    assert _stage(tmp_path, monkeypatch, lambda a, p: None, ["--log", "file/x.log"]) == 2
    assert "the log cannot be written there (" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (["-1"], "--weights = -1.0 is not allowed; each weight must be a finite number >= 0"),
        (["nan"], "--weights = nan is not allowed; each weight must be a finite number >= 0"),
        (["1", "inf"], "--weights = inf is not allowed; each weight must be a finite number"),
        (["1", "3", "1"], "--weights = 1.0 is not allowed; it is given 2 times: list each"),
    ],
)
def test_tune_refuses_weights_it_cannot_train_once_each(tmp_path, weights, expected):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    proc = _cli("pipeline.tune", "--weights", *weights, cwd=tmp_path)
    assert expected in _one_error_line(proc)


# -- 9. a file the study reads that it also writes ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "job"),
    [
        (
            "students.small_cnn.init",
            "file:data/models/st--small_cnn--s0.safetensors",
            "distill-st--small_cnn--s0",
        ),
        (
            "students.small_cnn.init",
            "file:./data/models/../models/pgdat--kd--small_cnn--s0.safetensors",
            "distill-pgdat--kd--small_cnn--s0",
        ),
        ("students.small_cnn.init", "file:data/models/pgdat.safetensors", "teacher-pgdat"),
        ("teachers.pgdat.source", "file:data/shards/train-000000.tar", "shard"),
    ],
)
def test_a_file_the_study_writes_cannot_be_one_it_reads(key, value, job):
    raw = _set(RAW, key, value)
    if key.startswith("teachers"):
        raw = _set(raw, "teachers.pgdat.train", {})
    params = validate(raw, build=False)
    with pytest.raises(ParamError) as info:
        dag.jobs(params)
    msg = str(info.value)
    assert msg.startswith(f"params: {key} = {value!r} is not allowed; ")
    assert f"(job {job} writes it), and a file the study reads may not be one it writes" in msg


def test_the_dag_cli_refuses_a_cyclic_init_in_one_line(tmp_path):
    raw = _set(TINY, "students.small_cnn.init", "file:data/models/st--small_cnn--s0.safetensors")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    line = _one_error_line(_cli("pipeline.dag", cwd=tmp_path))
    assert "job distill-st--small_cnn--s0 writes it" in line
    assert not (tmp_path / "dvc.yaml").exists()


def _snakemake_dry_run(study: Path) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "Snakefile", study / "Snakefile")
    return subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1"],
        cwd=study,
        env=env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_snakemake_refuses_a_cyclic_init_before_any_job(tmp_path):
    raw = _set(TINY, "students.small_cnn.init", "file:data/models/st--small_cnn--s0.safetensors")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _snakemake_dry_run(tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "job distill-st--small_cnn--s0 writes it" in out and "Cyclic" not in out


@pytest.mark.slow
def test_snakemake_refuses_an_alias_bomb_as_the_dataset_root(tmp_path):
    text = yaml.safe_dump(_set(TINY, "shard.root", "R"), sort_keys=False)
    text = text.replace("root: R\n", "root: *b29\n")
    bomb = _bomb().replace("\n", "\n  ")
    (tmp_path / "params.yaml").write_text(f"bomb:\n  {bomb}\n{text}")
    assert "root: *b29" in text and (tmp_path / "params.yaml").stat().st_size < 5000
    proc = _snakemake_dry_run(tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "its aliases (*name) expand it to" in out and "MemoryError" not in out


# -- 10. SIGINT to a training job -------------------------------------------------------------


@pytest.fixture
def long_distill(tiny_study_built, tmp_path):
    """The tiny study's params with many epochs, its shards and teacher."""
    study = tmp_path / "study"
    (study / "data" / "models").mkdir(parents=True)
    params = TINY | {"distill": TINY["distill"] | {"epochs": 1000}}
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_study_built / "data" / "shards", study / "data" / "shards")
    for name in ("pgdat.safetensors", "pgdat.json"):
        shutil.copy2(tiny_study_built / "data" / "models" / name, study / "data" / "models" / name)
    return study


def _epoch(progress: dict | None) -> int:
    """The epoch a training job's progress file shows (0 before its first)."""
    found = re.search(r"epoch (\d+)/", str((progress or {}).get("step")))
    return int(found.group(1)) if found else 0


def _sigint_at_default() -> None:
    """A job started from a terminal gets SIGINT at its default action; a test worker may
    ignore SIGINT, and its children would inherit that (as a shell's background jobs do)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("forkserver", ["0", "1"])
def test_an_interrupted_distill_job_says_where_and_exits_130(long_distill, forkserver):
    from pipeline.progress import progress_path, read_progress

    study, model = long_distill, "st--small_cnn--s0"
    log = dag.log_path("distill", model)
    progress = study / progress_path("distill", model)
    with open(study / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.stages", "distill", "--model", model, "--log", log],
            cwd=study,
            env=env(PYTHONPATH=str(ROOT), KDIGA_FORKSERVER=forkserver),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_sigint_at_default,
        )
        try:
            deadline = time.monotonic() + 60
            while _epoch(read_progress(progress)) < 2:  # a checkpoint is written
                assert proc.poll() is None and time.monotonic() < deadline, stderr.name
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        stderr.seek(0)
        err = stderr.read()
    line = _one_error_line(SimpleNamespace(returncode=proc.returncode, stderr=err), code=130)
    assert re.search(
        r"distill interrupted at epoch \d+/1000, step \d+/\d+; its training "
        r"checkpoint .* is kept: run the job again to resume from it",
        line,
    ), line
    assert list((study / "data" / "checkpoints" / "distill").glob(f"{model}-*.pt"))
    assert read_progress(progress)["state"] == "failed"


# -- 12, 13, 15. settings that train nothing, or check nothing ----------------------------------


@pytest.mark.parametrize(
    "key", ["distill.epochs", "students.small_cnn.epochs", "teachers.pgdat.train.epochs"]
)
def test_zero_epochs_is_refused(key):
    msg = _refused(_set(RAW, key, 0))
    assert msg.startswith(f"params: {key} = 0 is not allowed; expected an integer >= 1 and ")
    assert "0 epochs leaves the model untrained" in msg


def test_a_loss_whose_every_term_weighs_zero_is_refused():
    zero = _set(_set(RAW, "distill.ce_weight", 0), "distill.kl_weight", 0.0)
    msg = _refused(_set(zero, "distill.methods", ["st", "kd"]))
    assert msg.startswith(
        "params: distill.ce_weight = 0.0 is not allowed; method kd's loss is "
        "weighted by distill.ce_weight and distill.kl_weight, all 0"
    )
    validate(
        _set(zero, "distill.methods", ["st", "kdiga", "rslad", "adaad", "iad", "igdm"]), build=False
    )  # IGA (weight 1), and methods with terms of their own
    no_iga = _set(_set(zero, "distill.methods", ["kdiga_ardc"]), "distill.iga.weight", 0)
    assert "distill.ce_weight and distill.kl_weight and distill.iga.weight, all 0" in _refused(
        no_iga
    )


@pytest.mark.parametrize("init", ["scratch", "pretrained"])
def test_a_sha256_on_a_student_that_reads_no_file_is_refused(init):
    raw = _set(RAW, "students.small_cnn.sha256", "0" * 64)
    if init == "pretrained":
        raw = _set(raw, "students.small_cnn.arch", "timm:resnet18")
        raw = _set(_set(raw, "students.small_cnn.init", init), "shard.dataset", "synthetic")
    msg = _refused(raw)
    assert msg.startswith("params: students.small_cnn.sha256 = '000")
    assert f"a sha256 checks an init file: students.small_cnn.init is {init}" in msg
    msg = _refused(_set(RAW, "teachers.pgdat.sha256", "0" * 64))
    assert "a train teacher reads none; use sha256: null" in msg


# -- 14, 16, 17. allowed, but it changes less than it seems: a warning --------------------------


def _warnings(raw) -> list[str]:
    return [str(w) for w in validate(raw, build=False).warnings]


def test_presets_and_the_default_study_warn_of_nothing():
    for path in ("params.yaml", "configs/cifar10.yaml", "configs/imagenet.yaml"):
        assert _warnings(read_yaml(ROOT / path)) == [], path


def test_a_milestone_after_the_last_epoch_is_warned_of_and_marked_in_the_report():
    raw = _set(_set(RAW, "students.small_cnn.milestones", [1, 50]), "students.small_cnn.epochs", 2)
    raw = _set(raw, "teachers.pgdat.train.milestones", [15])
    assert _warnings(raw) == [
        "params: teachers.pgdat.train.milestones: 15 is not below the 15 epochs: the learning "
        "rate would drop after the last epoch, so no effect on teacher pgdat's training",
        "params: students.small_cnn.milestones: 50 is not below the 2 epochs: the learning "
        "rate would drop after the last epoch, so no effect on student small_cnn's training",
    ]
    params = validate(raw, build=False)
    numbers = SimpleNamespace(histories={i: [{"val_acc": 0.5}] * 2 for i in student_ids(params)})
    table = report.training_table(params, numbers)
    assert "| lr milestones |" in table.splitlines()[0]
    assert "| 2 | 1, 50 (no effect: after the last epoch) | 50.0 |" in table


def test_check_samples_above_the_images_the_bounds_use_is_warned_of():
    raw = _set(_set(RAW, "bounds.check_samples", 500), "bounds.samples", 1000)
    raw = _set(raw, "shard.test_samples", 300)
    assert _warnings(raw) == [
        "params: bounds.check_samples: 500 is more than the 300 images the bounds use (the "
        "300 test images): Proposition 2 is tested on all 300"
    ]
    raw = _set(_set(RAW, "bounds.check_samples", 80), "bounds.samples", 50)
    assert "is more than the 50 images the bounds use (bounds.samples)" in _warnings(raw)[0]
    args = SimpleNamespace(teacher=None, attack=None, model="pgdat--kd--small_cnn--s0")
    logged = common._job_warnings(validate(raw, build=False), "bounds", args)
    assert [str(w) for w in logged] == _warnings(raw)  # each bounds job logs it


def test_an_autoattack_list_its_version_ignores_is_logged_by_the_autoattack_jobs(
    tmp_path, monkeypatch, capsys
):
    raw = _set(TINY, "bounds.check_samples", 40)  # no warning of its own
    raw = _set(
        _set(raw, "attack.autoattack.version", "standard"), "attack.autoattack.attacks", ["apgd-ce"]
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    expected = (
        "params: attack.autoattack.attacks: [apgd-ce] is not used: version standard runs its "
        "own attacks (apgd-ce, apgd-t, fab-t, square); the list is for version custom"
    )
    assert _warnings(raw) == [expected]

    def add(ap):
        ap.add_argument("--model")
        ap.add_argument("--attack")

    logged = {}
    for attack in ("autoattack", "pgd"):
        argv = ["--model", "pgdat", "--attack", attack]
        assert _stage(tmp_path, monkeypatch, lambda a, p: None, argv, "attack", add) == 0
        logged[attack] = [line for line in capsys.readouterr().err.splitlines() if "WARN" in line]
    assert len(logged["autoattack"]) == 1 and logged["autoattack"][0].endswith(expected)
    assert logged["pgd"] == []
    assert (
        _warnings(_set(raw, "attack.autoattack.attacks", ["apgd-t", "fab-t", "square", "apgd-ce"]))
        == []
    )
    del raw["attack"]["autoattack"]["attacks"]  # not written: nothing is ignored
    assert _warnings(raw) == []


def test_the_params_cli_prints_the_warnings(tmp_path):
    path = tmp_path / "params.yaml"
    raw = _set(_set(TINY, "distill.milestones", [1]), "bounds.check_samples", 0)
    path.write_text(yaml.safe_dump(raw))
    proc = _cli("pipeline.params", str(path))
    assert proc.returncode == 0 and proc.stdout.startswith("ok: ")
    assert proc.stderr.splitlines() == [
        "warning: params: distill.milestones: 1 is not below the 1 epochs: the learning rate "
        "would drop after the last epoch, so no effect on student small_cnn's training"
    ]


# -- 18. the report names the split it evaluated ------------------------------------------------


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_the_uncertainty_note_names_the_split_evaluated(seeds):
    params = validate(_set(_set(RAW, "attack.split", "val"), "seeds", seeds), build=False)
    note = report.uncertainty_note(params, 239)
    assert "the 239 val images" in note and "test images" not in note
    params = validate(_set(RAW, "seeds", seeds), build=False)
    assert "the 239 test images" in report.uncertainty_note(params, 239)


# -- 19. ids that read alike --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("teachers", "st"),
        ("students", "kd"),
        ("students", "vs"),
        ("teachers", "s1"),
        ("students", "x" * 65),
    ],
)
def test_names_that_would_make_ids_read_alike_are_refused(key, name):
    raw = copy.deepcopy(RAW)
    raw[key][name] = copy.deepcopy(raw[key]["pgdat" if key == "teachers" else "small_cnn"])
    msg = _refused(raw)
    assert msg.startswith(f"params: {key}.{name[:40]}")
    if len(name) > 64:
        assert "a name is up to 64 letters" in msg
    else:
        assert "may not be named after a method (st, kd, ard," in msg and "read alike" in msg


def test_student_ids_parse_back_to_their_jobs_and_nothing_else():
    params = validate(_set(RAW, "seeds", [0, 7]), build=False)
    for sid in student_ids(params):
        assert parse_student_id(params, sid).id == sid
    for bad in (
        "st--small_cnn--s07",
        "pgdat--st--small_cnn--s0",
        "kd--small_cnn--s0",
        "pgdat--kd--small_cnn--s1",
        "nobody--kd--small_cnn--s0",
        "x" * 10_000,
    ):
        with pytest.raises(ParamError, match="not a student of this study"):
            parse_student_id(params, bad)


# -- 21. the size of the grid -------------------------------------------------------------------


def _table_seconds(seeds: int) -> float:
    params = validate(_set(RAW, "seeds", list(range(seeds))), build=False)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        dag.jobs(params)
        best = min(best, time.perf_counter() - start)
    return best


def test_the_job_table_grows_linearly_with_the_grid():
    small, large = _table_seconds(30), _table_seconds(300)
    assert large / small < 30, (small, large)  # linear: about 10; one scan per job: about 100


def test_a_study_of_more_than_10000_jobs_is_warned_of(caplog, monkeypatch):
    monkeypatch.setattr(dag, "_warned", set())  # warned once a process: as in a new one
    params = validate(_set(RAW, "seeds", list(range(300))), build=False)
    with caplog.at_level("WARNING", logger="kdiga.pipeline.dag"):
        count = len(dag.jobs(params))
    assert count > 10_000
    assert [r.getMessage() for r in caplog.records] == [
        f"the study has {count:,} jobs (more than 10,000): Snakemake and DVC check every job "
        "at each run and slow down at this size; fewer seeds, students or methods per study "
        "keep it quick"
    ]


def test_the_dag_cli_refuses_an_output_that_is_a_directory(tmp_path):
    """`python -m pipeline.dag --output <a directory>`: one line, exit 2, nothing written."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.dag", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: params: --output = {str(tmp_path)!r} is not allowed; it is a directory: give a "
        "file (dvc.yaml)"
    ]
    assert list(tmp_path.iterdir()) == []
