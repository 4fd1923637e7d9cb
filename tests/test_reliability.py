"""Faults injected into real stage runs: each stops with a message naming the problem, and
nothing is lost or left half-written."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tiny_study import TINY, env

from kdiga import files, utils
from kdiga.files import ArtifactWriteError, atomic_path, atomic_write_text
from kdiga.utils import atomic_torch_save
from pipeline.params import validate

KD, KDIGA, ST = "pgdat--kd--small_cnn--s0", "pgdat--kdiga--small_cnn--s0", "st--small_cnn--s0"


def stage(study: Path, name: str, *args: str, params: dict | None = None):
    if params is not None:
        (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.stages", name, *args],
        cwd=study,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def failed_cleanly(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 with one error line (printed once) holding every needle, and no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], proc.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded(tiny_study_built, tmp_path_factory) -> Path:
    """A study directory with the tiny study's params, shards and teacher (copied from the
    finished tiny study: the same stages with the same params made them)."""
    study = tmp_path_factory.mktemp("faults")
    shutil.copy(tiny_study_built / "params.yaml", study / "params.yaml")
    shutil.copytree(tiny_study_built / "data" / "shards", study / "data" / "shards")
    models = study / "data" / "models"
    models.mkdir()
    for name in ("pgdat.safetensors", "pgdat.json"):
        shutil.copy2(tiny_study_built / "data" / "models" / name, models / name)
    written = validate(yaml.safe_load((study / "params.yaml").read_text()), build=False)
    assert written == validate(TINY, build=False)  # the tiny study, unset keys at their defaults
    return study


def _copy_study(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.pt"
    atomic_torch_save({"a": 1}, target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed half-way")
    assert torch.load(target) == {"a": 1}  # the complete old file, not the partial one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def _only(directory: Path, *names: str) -> None:
    """Nothing but ``names`` in ``directory``: no temporary file was left behind."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


def test_disk_full_while_writing_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "models" / "x.safetensors"
    atomic_write_text("complete", target)
    with pytest.raises(ArtifactWriteError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == (
        f"cannot write {target}: No space left on device (errno 28, while writing); "
        "any earlier file there is unchanged"
    )
    assert info.value.errno == errno.ENOSPC and info.value.path == target
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_text() == "complete"
    _only(target.parent, "x.safetensors")


def test_torch_save_on_a_full_disk_gives_the_errno_not_inline_container(tmp_path, monkeypatch):
    """torch.save really writes into /dev/full (every write fails with ENOSPC)."""
    target = tmp_path / "m.pt"
    atomic_torch_save({"a": 1}, target)
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        return real_open("/dev/full" if "w" in mode else file, mode, *args, **kwargs)

    monkeypatch.setattr(utils, "open", full_disk_open, raising=False)
    with pytest.raises(ArtifactWriteError) as info:
        atomic_torch_save({"w": torch.zeros(100_000)}, target)
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: No space left on device (errno 28")
    assert "inline_container" not in message and "\n" not in message
    monkeypatch.undo()
    assert torch.load(target) == {"a": 1}
    _only(tmp_path, "m.pt")


def test_torch_save_write_failure_runtime_error_becomes_artifact_write_error(tmp_path, monkeypatch):
    """Where torch's C++ writer fails on its own, it raises RuntimeError without an errno."""
    target = tmp_path / "m.pt"

    def failing_save(obj, f):
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(ArtifactWriteError) as info:
        atomic_torch_save({"a": 1}, target)
    assert str(info.value) == (
        f"cannot write {target}: torch.save could not write the file (is the disk full or over "
        "quota?) (while writing); any earlier file there is unchanged"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    _only(tmp_path)

    def buggy_save(obj, f):
        raise RuntimeError("a bug")

    monkeypatch.setattr(torch, "save", buggy_save)
    with pytest.raises(RuntimeError, match=r"^a bug$"):  # other errors pass through unchanged
        atomic_torch_save({"a": 1}, target)
    _only(tmp_path)


def test_read_only_directory_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "evals"
    target = out / "r.json"
    atomic_write_text("old", target)
    out.chmod(0o555)
    try:
        probe = out / "probe"
        try:  # root ignores directory permissions: then refuse the temp file by monkeypatch
            probe.touch()
            probe.unlink()
        except PermissionError:
            pass
        else:

            def refuse(*_args, dir=None, prefix="", suffix="", **_kwargs):
                name = os.path.join(dir, f"{prefix}abc123{suffix}")
                raise PermissionError(errno.EACCES, "Permission denied", name)

            monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
        with pytest.raises(ArtifactWriteError) as info:
            atomic_write_text("new", target)
    finally:
        out.chmod(0o755)
    assert str(info.value) == (
        f"cannot write {target}: Permission denied (errno 13, while creating a temporary file "
        "beside it); any earlier file there is unchanged"
    )
    assert isinstance(info.value.__cause__, PermissionError)
    assert target.read_text() == "old"
    _only(out, "r.json")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text("x", tmp_path / "a.txt")
        atomic_torch_save({"a": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == mode


@pytest.mark.slow
def test_truncated_shard_names_the_file(sharded, tmp_path):
    study = _copy_study(sharded, tmp_path / "s")
    shard = study / "data" / "shards" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = stage(study, "distill", "--model", ST)
    failed_cleanly(proc, "train-000000.tar")
    assert not (study / "data" / "models" / f"{ST}.safetensors").exists()


@pytest.mark.slow
def test_unloadable_checkpoint_names_the_file(sharded, tmp_path):
    study = _copy_study(sharded, tmp_path / "s")
    (study / "data" / "models" / "pgdat.safetensors").write_bytes(b"not a checkpoint")
    proc = stage(study, "attack", "--model", "pgdat", "--attack", "pgd")
    failed_cleanly(proc, "pgdat.safetensors")
    assert not (study / "data" / "evals").exists()


@pytest.mark.slow
def test_nan_loss_names_epoch_and_batch(sharded, tmp_path):
    study = _copy_study(sharded, tmp_path / "s")
    params = json.loads(json.dumps(TINY))
    params["distill"]["lr"] = 1e30
    proc = stage(study, "distill", "--model", ST, params=params)
    failed_cleanly(proc, "non-finite loss at epoch 1, batch")
    assert not (study / "data" / "models" / f"{ST}.safetensors").exists()


@pytest.mark.slow
def test_same_seed_same_params_same_bytes(sharded, tmp_path):
    """Training and evaluation on CPU are deterministic to the byte: two fresh runs write
    identical model and evaluation files (no wall clock, no per-save id in them)."""
    from kdiga.files import sha256_file

    runs = []
    for i in range(2):
        study = _copy_study(sharded, tmp_path / f"s{i}")
        proc = stage(study, "distill", "--model", KDIGA)
        ok(proc)
        assert len(re.findall(r"epoch 1/1 ", proc.stderr)) == 1  # one line per epoch, for people
        assert "{'epoch'" not in proc.stderr
        ok(stage(study, "attack", "--model", KDIGA, "--attack", "pgd"))
        files = (
            f"models/{KDIGA}.safetensors",
            f"models/{KDIGA}.history.json",
            f"evals/{KDIGA}--pgd.json",
        )
        runs.append({f: sha256_file(study / "data" / f) for f in files})
        timing = json.loads((study / "logs" / "distill" / f"{KDIGA}.timing.json").read_text())
        assert timing["seconds"] > 0  # wall clock lives beside the logs
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_a_model_file_written_for_another_model_is_refused(sharded, tmp_path):
    """The teacher's file copied to a student's path: refused, not evaluated as the student."""
    study = _copy_study(sharded, tmp_path / "s")
    models = study / "data" / "models"
    (models / f"{KD}.safetensors").write_bytes((models / "pgdat.safetensors").read_bytes())
    proc = stage(study, "attack", "--model", KD, "--attack", "pgd")
    failed_cleanly(proc, f"{KD}.safetensors was made by job 'teacher-pgdat', not 'distill-{KD}'")
    assert not (study / "data" / "evals").exists()


@pytest.mark.slow
def test_a_finished_run_leaves_no_checkpoint_and_a_replaced_output_is_caught(sharded, tmp_path):
    """The resume checkpoint goes once the model is written (a later run with other code or
    data can never resume it); an output replaced after its job ran no longer passes."""
    from kdiga.files import sha256_file

    study = _copy_study(sharded, tmp_path / "s")
    ok(stage(study, "distill", "--model", ST))
    assert not list((study / "data" / "checkpoints").rglob(f"{ST}-*"))
    history = study / "data" / "models" / f"{ST}.history.json"
    old = sha256_file(history)
    history.write_text("[]\n")
    proc = stage(study, "attack", "--model", ST, "--attack", "pgd")
    failed_cleanly(proc, f"{ST}.history.json has sha256", old[:16], "it was replaced")


def test_a_model_of_another_architecture_is_refused_at_load(tmp_path, monkeypatch):
    """Provenance aside, the stage's loader checks the architecture and model id it expects."""
    from kdiga.models import CheckpointError, build_model, save_model
    from pipeline import dag
    from pipeline.params import validate
    from pipeline.stages.common import load_stage_model

    monkeypatch.chdir(tmp_path)
    params = validate(json.loads(json.dumps(TINY)))
    path = Path(dag.model_path(KD))
    path.parent.mkdir(parents=True)
    save_model(build_model("resnet18", 10, in_chans=1, image_size=8), path)
    with pytest.raises(CheckpointError, match="holds a 'resnet18' model, but 'small_cnn' is exp"):
        load_stage_model(params, KD)
    student = build_model("small_cnn", 10, in_chans=1, image_size=8, width=8)  # as declared
    save_model(student, path, meta={"model_id": "x"})
    with pytest.raises(CheckpointError, match=f"written for model 'x', not '{KD}'"):
        load_stage_model(params, KD)


@pytest.mark.slow
def test_a_stale_input_stops_the_stage_naming_both_hashes(sharded, tmp_path):
    """A model re-trained with other params after its evaluation: bounds and the report would
    mix generations; the stage reading them stops and names the two hashes."""
    from kdiga.files import sha256_file

    study = _copy_study(sharded, tmp_path / "s")
    ok(stage(study, "distill", "--model", ST))
    ok(stage(study, "attack", "--model", ST, "--attack", "pgd"))
    model = study / "data" / "models" / f"{ST}.safetensors"
    old = sha256_file(model)
    params = json.loads(json.dumps(TINY))
    params["distill"]["lr"] = 0.01
    ok(stage(study, "distill", "--model", ST, params=params))
    new = sha256_file(model)
    assert old != new
    proc = stage(study, "report")
    failed_cleanly(
        proc, f"{ST}--pgd.json was made from", old[:16], new[:16], f"dvc repro attack-{ST}--pgd"
    )
    params["distill"]["lr"] = 0.05  # back: now the model itself is not what params make
    proc = stage(study, "attack", "--model", ST, "--attack", "pgd", params=params)
    failed_cleanly(proc, f"{ST}.safetensors was made with params distill.lr = 0.01, now 0.05")


_KILLED_AUTOATTACK = textwrap.dedent(
    """
    import os, signal, sys, torch
    from kdiga.attacks import robust_sweep
    from kdiga.data import load_dataset, to_float
    from kdiga.models import build_model
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_chans=1, image_size=8, width=8).eval()
    x, y = load_dataset("digits", "test", image_size=8, n=96, seed=0)
    calls = [0]
    def hook(module, args):
        # Once the first batch's progress is saved, die a few model calls into the next one.
        if os.environ.get("KILL_AFTER") and os.path.exists(sys.argv[1]):
            calls[0] += 1
            if calls[0] > int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)
    model.register_forward_pre_hook(hook)
    result = robust_sweep(model, to_float(x), y, [0.05, 0.1], attack="autoattack",
                          batch_size=32, seed=0, state_path=sys.argv[1],
                          autoattack_kwargs={"version": "custom", "attacks": ["apgd-ce"],
                                             "n_iter": 10})
    torch.save({"robust": result.robust, "clean": result.clean_correct}, sys.argv[2])
    """
)


@pytest.mark.slow
def test_autoattack_killed_half_way_resumes_to_the_same_result(tmp_path):
    script = tmp_path / "aa.py"
    script.write_text(_KILLED_AUTOATTACK)

    def go(state: Path, out: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), str(state), str(out)],
            env=env(**extra),
            capture_output=True,
            text=True,
            timeout=600,
        )

    ok(go(tmp_path / "plain.state", tmp_path / "plain.pt"))
    killed = go(tmp_path / "k.state", tmp_path / "k.pt", KILL_AFTER="5")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "k.state").exists() and not (tmp_path / "k.pt").exists()
    ok(go(tmp_path / "k.state", tmp_path / "k.pt"))
    plain, resumed = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "k.pt")
    assert torch.equal(plain["robust"], resumed["robust"])
    assert torch.equal(plain["clean"], resumed["clean"])


def test_report_marks_a_suspect_result(tmp_path, monkeypatch):
    from pipeline.params import validate
    from pipeline.stages import report

    params = validate(json.loads(json.dumps(TINY)))
    good = {
        "clean": 0.9,
        "robust": [0.5, 0.3],
        "radii": [0.05, 0.1],
        "n": 10,
        "radius_labels": ["0.05", "0.1"],
        "suspect": False,
        "clean_correct": "1" * 9 + "0",
        "robust_correct": ["1" * 5 + "0" * 5, "1" * 3 + "0" * 7],
    }
    bad = good | {"suspect": True}
    numbers = report.Numbers.__new__(report.Numbers)
    numbers.params, numbers.attacks = params, ["pgd"]
    numbers.evals = {(m, "pgd"): good for m in ("pgdat", ST, KDIGA)} | {(KD, "pgd"): bad}
    from kdiga.attacks.sweep import per_sample_correct

    numbers.correct = {k: per_sample_correct(e) for k, e in numbers.evals.items()}
    numbers.teachers = {"pgdat": {"arch": "small_cnn", "kind": "PGD-AT"}}
    numbers.radii, numbers.radius_labels = [0.05, 0.1], ["0.05", "0.1"]
    table = report.accuracy_table(params, numbers, "pgdat", "pgd")
    suspect = [line for line in table.splitlines() if "(suspect)" in line]
    assert len(suspect) == 1 and suspect[0].startswith("| pgdat -KD-> small_cnn (suspect) |")


def _run_stage(tmp_path, monkeypatch, error: BaseException) -> int:
    """common.run with a body that raises ``error``, in a directory holding the tiny params."""
    from pipeline.stages import common

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))

    def body(args, params):
        raise error

    threads = torch.get_num_threads()
    try:
        return common.run("report", "test", body, [])
    finally:
        torch.set_num_threads(threads)  # run() pins them; leave the test process as it was


def test_a_project_error_is_one_logged_line(tmp_path, monkeypatch, capsys):
    from kdiga.models import CheckpointError

    assert _run_stage(tmp_path, monkeypatch, CheckpointError("x.safetensors: bad")) == 2
    err = capsys.readouterr().err
    assert err.count("x.safetensors: bad") == 1  # once, not logged and printed again
    assert "ERROR kdiga.pipeline: report failed: x.safetensors: bad" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("error", [KeyError("epoch"), ValueError("bug"), RuntimeError("OOM")])
def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch, error):
    """A bug (or CUDA running out of memory) is not a bad input: it propagates."""
    with pytest.raises(type(error)):
        _run_stage(tmp_path, monkeypatch, error)


def test_a_bad_thread_count_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDIGA_THREADS", "two")
    assert _run_stage(tmp_path, monkeypatch, AssertionError("not reached")) == 2
    assert "KDIGA_THREADS = 'two' is not allowed" in capsys.readouterr().err
