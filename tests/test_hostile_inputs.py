"""Hostile files and inputs: every artifact is checked by its content, every input is bounded.

Each test is one case of a hostile pass over the files a study reads: a model file whose
weights changed after its job wrote them, a resume checkpoint copied under another run's
name, temporaries left by ``kill -9``, downloads and in-memory data without bound, a model
header that asks for more than the study declares, links and special files in an
ImageFolder, text files given as checkpoints, empty or unknown model names, misleading
messages, and shards altered together with their manifest. Each gets one clear line (what is
wrong, what is allowed or what to do) or a refusal, and nothing is lost.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_reliability import failed_cleanly, ok, stage
from tiny_study import ROOT, TINY, copy_study

from kdiga.artifacts import save_tensors, tensors_sha256
from kdiga.files import atomic_write_text, read_meta, remove_stale_temporaries, sha256_file
from kdiga.models import CheckpointError, build_model, load_model, save_model
from kdiga.shards import ShardError, load_sharded, read_shards, write_manifest, write_shards
from kdiga.stream import list_image_folder, load_image_split, write_encoded_shards
from kdiga.teachers import DownloadTooLargeError, fetch_url, load_teacher
from kdiga.train import TrainConfig, fit
from pipeline.params import ParamError, check_paths, parse_student_id, validate
from pipeline.stages.common import checkpoint_path, load_stage_model, run_record

ST = "st--small_cnn--s0"
SMALL = dict(arch="small_cnn", num_classes=10, in_chans=1, image_size=8)


def small_cnn(width: int = 4):
    return build_model("small_cnn", 10, in_chans=1, image_size=8, width=width).eval()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and len(message) < 800, message
    return message


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def flip_weight_byte(path: Path) -> None:
    """Change one byte of a safetensors file's tensor data; header and mtime stay."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + 5] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def model_file(path: Path, model, meta: dict | None = None, **header) -> Path:
    """A model file whose header differs from what the model is by ``header`` (the hash of
    its tensors kept right: only the header lies)."""
    save_model(model, path, meta=meta)
    record = read_meta(path) | header
    save_tensors(model.net.state_dict(), path, meta=record)
    return path


# -- 1. a model's weights are checked against what its job wrote ---------------------------


def test_model_files_carry_the_hash_of_their_tensors(tmp_path):
    model = small_cnn()
    save_model(model, tmp_path / "a.safetensors")
    save_model(load_model(tmp_path / "a.safetensors")[0], tmp_path / "b.safetensors")
    assert read_meta(tmp_path / "a.safetensors")["tensors_sha256"] == tensors_sha256(
        model.net.state_dict()
    )
    assert sha256_file(tmp_path / "a.safetensors") == sha256_file(tmp_path / "b.safetensors")


def test_a_flipped_weight_byte_is_refused_naming_both_hashes_and_the_job(tmp_path):
    path = tmp_path / "m.safetensors"
    job = "distill-pgdat--kd--small_cnn--s0"
    save_model(small_cnn(), path, meta={"provenance": {"job": job}})
    recorded = read_meta(path)["tensors_sha256"]
    flip_weight_byte(path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = one_line(err)
    assert message.startswith(f"{path}: its tensors have sha256 ")
    assert f"its header records {recorded!r}" in message
    assert f"re-run its job {job!r}" in message
    with pytest.raises(CheckpointError, match="its tensors have sha256"):  # as a teacher file
        load_teacher(f"file:{path}", **SMALL)


def test_a_model_file_without_the_hash_is_refused(tmp_path):
    path = model_file(tmp_path / "old.safetensors", small_cnn())
    record = read_meta(path)
    del record["tensors_sha256"]
    save_tensors(small_cnn().net.state_dict(), path, meta=record)
    with pytest.raises(CheckpointError, match="older kdiga, without the hash of its tensors"):
        load_model(path)


@pytest.mark.slow
def test_a_tampered_student_stops_the_job_that_reads_it(tiny_study_built, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(tiny_study_built / "params.yaml", study)
    shutil.copytree(
        tiny_study_built / "data", study / "data", ignore=shutil.ignore_patterns("checkpoints")
    )
    path = study / "data" / "models" / f"{ST}.safetensors"
    flip_weight_byte(path)
    proc = stage(study, "attack", "--model", ST, "--attack", "pgd")
    failed_cleanly(
        proc,
        f"data/models/{ST}.safetensors: its tensors have sha256",
        "its header records",
        f"re-run its job 'distill-{ST}'",
    )


@pytest.mark.slow
def test_a_tampered_model_is_made_again_not_reused(tiny_study_built, tmp_path, monkeypatch):
    """With KDIGA_REUSE_CURRENT=1 (as the Snakefile runs jobs) a job whose outputs are
    current keeps them; a model file whose tensors were edited since is not what its job
    wrote, so the job runs again (naming why) and writes the same bytes it wrote before."""
    study = copy_study(tiny_study_built, tmp_path / "study")  # with its code: the same digest
    path = study / "data" / "models" / f"{ST}.safetensors"
    written = path.read_bytes()
    monkeypatch.setenv("KDIGA_REUSE_CURRENT", "1")
    kept = stage(study, "distill", "--model", ST)
    ok(kept)
    assert f"distill-{ST}: its outputs are current" in kept.stderr, kept.stderr[-1500:]
    flip_weight_byte(path)
    again = stage(study, "distill", "--model", ST)
    ok(again)
    assert f"distill-{ST}: running (data/models/{ST}.safetensors: its tensors have sha256" in (
        again.stderr
    )
    assert path.read_bytes() == written


# -- 2. a resume checkpoint carries the run it was made for --------------------------------


def _record(weight: float) -> dict:
    return {
        "job": "distill-pgdat--kdiga--small_cnn--s0",
        "params": {"distill.iga": {"weight": weight, "reduction": "per_sample_mean"}},
        "inputs": {"data/shards": "ab" * 32},
        "code": "cd" * 32,
    }


class CE(torch.nn.Module):
    def forward(self, student, teacher, x, y, teacher_out=None):
        loss = torch.nn.functional.cross_entropy(student(x), y)
        return {"loss": loss}


def test_a_checkpoint_copied_under_another_runs_name_is_not_resumed(tmp_path):
    from kdiga.data import load_dataset

    x, y = load_dataset("synthetic", "train", n=64, image_size=8, channels=1, seed=1)
    ckpt = tmp_path / "kdiga-w2.pt"  # the name of the weight-2 run, made by the weight-3 run
    cfg = TrainConfig(epochs=1, batch_size=32)
    fit(small_cnn(), CE(), x, y, cfg, checkpoint_path=ckpt, checkpoint_record=_record(3.0))
    resumed = TrainConfig(epochs=2, batch_size=32)
    with pytest.raises(CheckpointError) as err:
        fit(small_cnn(), CE(), x, y, resumed, checkpoint_path=ckpt, checkpoint_record=_record(2.0))
    message = one_line(err)
    assert message.startswith(f"{ckpt}: resume checkpoint was made for another run: ")
    assert "params.distill.iga.weight is 3.0 in it, 2.0 now" in message
    assert message.endswith("delete it to start this run over")
    history = fit(
        small_cnn(), CE(), x, y, resumed, checkpoint_path=ckpt, checkpoint_record=_record(3.0)
    )
    assert [h["epoch"] for h in history] == [1, 2]  # its own run resumes it


def test_a_checkpoint_without_a_record_is_not_resumed_by_a_run_with_one(tmp_path):
    from kdiga.data import load_dataset

    x, y = load_dataset("synthetic", "train", n=64, image_size=8, channels=1, seed=1)
    ckpt = tmp_path / "c.pt"
    fit(small_cnn(), CE(), x, y, TrainConfig(epochs=1, batch_size=32), checkpoint_path=ckpt)
    with pytest.raises(CheckpointError, match="records no run"):
        fit(
            small_cnn(),
            CE(),
            x,
            y,
            TrainConfig(epochs=2, batch_size=32),
            checkpoint_path=ckpt,
            checkpoint_record=_record(1.0),
        )


def test_the_run_record_is_the_jobs_identity_not_its_machine():
    provenance = _record(1.0) | {"machine": {"cpu": "x", "threads": 4}}
    assert run_record(provenance) == _record(1.0)
    elsewhere = _record(1.0) | {"machine": {"cpu": "y", "threads": 2, "gpu": "NVIDIA H100"}}
    name = checkpoint_path("distill", ST, provenance)
    assert name == checkpoint_path("distill", ST, elsewhere)  # resumed on another machine
    assert name != checkpoint_path("distill", ST, _record(2.0))


@pytest.mark.slow
def test_a_distill_job_refuses_a_checkpoint_copied_from_another_weight(
    tiny_study_built, tmp_path, monkeypatch
):
    from pipeline.params import load_params
    from pipeline.provenance import current_job, make_record

    job = "pgdat--kdiga--small_cnn--s0"
    study = tmp_path / "study"
    shutil.copytree(tiny_study_built, study, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    model = study / "data" / "models" / f"{job}.safetensors"
    model.unlink()
    model.mkdir()  # the weight-3 run trains, keeps its checkpoint, and cannot write its model
    raw = copy.deepcopy(TINY)
    raw["distill"]["iga"]["weight"] = 3.0
    assert stage(study, "distill", "--model", job, params=raw).returncode == 2
    (made,) = (study / "data" / "checkpoints" / "distill").iterdir()
    raw["distill"]["iga"]["weight"] = 2.0
    write_params(study, raw)
    monkeypatch.chdir(study)
    params = load_params("params.yaml", build=False)
    name = checkpoint_path("distill", job, make_record(params, current_job(params, "distill", job)))
    shutil.copy(made, name)  # the weight-3 checkpoint under the weight-2 run's name
    model.rmdir()
    proc = stage(study, "distill", "--model", job)
    failed_cleanly(
        proc,
        f"{name}: resume checkpoint was made for another run: ",
        "distill.iga.weight is 3.0 in it, 2.0 now",
    )
    assert name.exists() and not model.exists()  # nothing deleted, nothing written


# -- 3. temporaries of killed writers are removed by the next writer -----------------------

_WRITER = textwrap.dedent(
    """
    import sys, time
    from kdiga.files import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"partial")
        print(tmp, flush=True)
        time.sleep(120)
    """
)


def _writer(target: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    return proc, Path(proc.stdout.readline().strip())


def test_the_temporary_of_a_killed_writer_is_removed_by_the_next_one(tmp_path):
    target = tmp_path / "model.safetensors"
    killed, stale = _writer(target)
    running, live = _writer(target)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert stale.exists() and (stale.stat().st_mode & 0o777) == 0o600
        atomic_write_text("done", target)
        assert not stale.exists()  # its writer is gone
        assert live.exists()  # its writer is still writing
    finally:
        running.kill()
        running.wait()
    assert target.read_text() == "done"


def test_only_temporaries_of_gone_writers_of_this_host_are_removed(tmp_path):
    from kdiga.files import _host

    target = tmp_path / "x.json"
    gone = tmp_path / f".x.json.{dead_pid()}@{_host()}.abcd1234.tmp"
    older = tmp_path / ".x.json.k3j9x0qa.tmp"  # an older kdiga's: no writer in the name
    running = tmp_path / f".x.json.{os.getpid()}@{_host()}.abcd1234.tmp"
    other_host = tmp_path / f".x.json.{dead_pid()}@elsewhere-node.abcd1234.tmp"
    other_file = tmp_path / ".y.json.1@node.abcd1234.tmp"
    for p in (gone, older, running, other_host, other_file):
        p.write_text("partial")
    assert sorted(remove_stale_temporaries(target)) == sorted([gone, older])
    assert running.exists() and other_host.exists() and other_file.exists()


@pytest.fixture
def empty_study(tmp_path) -> Path:
    study = tmp_path / "study"
    (study / "data").mkdir(parents=True)
    return study


def write_params(study: Path, params: dict) -> None:
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_the_shard_job_removes_the_folder_a_killed_run_left(empty_study):
    code = (
        "import tempfile; from kdiga.files import temporary_prefix; "
        "print(tempfile.mkdtemp(dir='data', prefix=temporary_prefix('shards')))"
    )
    made = subprocess.run(
        [sys.executable, "-c", code],
        cwd=empty_study,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    left = empty_study / made.stdout.strip()
    older = empty_study / "data" / ".shards-k3j9x0qa"  # as an older kdiga named them
    for folder in (left, older):
        folder.mkdir(exist_ok=True)
        (folder / "train-000000.tar").write_bytes(b"\0" * 1024)
    write_params(empty_study, TINY)
    proc = stage(empty_study, "shard")
    ok(proc)
    for folder in (left, older):
        assert not folder.exists()
        assert f"removed {folder.relative_to(empty_study)}, left by an interrupted shard job" in (
            proc.stderr
        )
    assert sorted(p.name for p in (empty_study / "data").iterdir()) == ["shards"]


# -- 4. downloads are bounded and clean up after themselves --------------------------------


def test_a_url_reads_regular_files_only(tmp_path):
    with pytest.raises(CheckpointError, match=r"/dev/zero is a character device, not a file"):
        fetch_url("file:///dev/zero", "0" * 64, tmp_path / "cache")
    with pytest.raises(CheckpointError, match=r"is a directory, not a file"):
        fetch_url(tmp_path.as_uri(), "0" * 64, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_download_over_its_cap_stops_and_keeps_nothing(tmp_path):
    big = tmp_path / "big.pt"
    big.write_bytes(b"\0" * 3_000_000)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadTooLargeError) as err:
        fetch_url(big.as_uri(), sha256_file(big), cache, max_mb=1)
    assert "over the cap of 1 MB (max_mb); nothing was kept" in one_line(err)
    assert list(cache.iterdir()) == []


class _Endless:
    """An https response without end and without a length, as a hostile server sends."""

    def __init__(self) -> None:
        self.headers: dict = {}

    def read(self, n: int = -1) -> bytes:
        return b"\0" * (n if n > 0 else 1 << 16)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_endless_download_stops_at_the_cap(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Endless())
    cache = tmp_path / "cache"
    start = time.perf_counter()
    with pytest.raises(DownloadTooLargeError, match="it sent more than that, over the cap of 2 MB"):
        fetch_url("https://example.org/w.pt", "0" * 64, cache, max_mb=2)
    assert time.perf_counter() - start < 10 and list(cache.iterdir()) == []


def test_a_killed_downloads_temporary_is_removed_by_the_next_download(tmp_path):
    from kdiga.files import _host
    from kdiga.teachers import cache_path

    src = tmp_path / "w.pt"
    torch.save(small_cnn().net.state_dict(), src)
    digest, cache = sha256_file(src), tmp_path / "cache"
    dest = cache_path(src.as_uri(), digest, cache)
    cache.mkdir()
    stale = cache / f".{dest.name}.{dead_pid()}@{_host()}.q1w2e3r4.tmp"
    stale.write_bytes(b"\0" * 100)
    stale.chmod(0o600)
    assert fetch_url(src.as_uri(), digest, cache) == dest
    assert sorted(p.name for p in cache.iterdir()) == [dest.name]


def test_the_teacher_job_names_the_cap_key(tmp_path, monkeypatch):
    from pipeline.stages.teacher import _fetch

    big = tmp_path / "big.pt"
    big.write_bytes(b"\0" * 2_000_000)
    raw = copy.deepcopy(TINY)
    raw["teachers"]["pgdat"] = {
        "source": f"url:{big.as_uri()}",
        "arch": "small_cnn",
        "sha256": sha256_file(big),
        "max_mb": 1,
    }
    params = validate(raw, build=False)
    assert validate(TINY, build=False).teachers["pgdat"].max_mb == 2048
    monkeypatch.chdir(tmp_path)  # the job's download cache is data/teachers/cache
    with pytest.raises(ParamError) as err:
        _fetch("pgdat", params.teachers["pgdat"], params.data)
    assert one_line(err).startswith("params: teachers.pgdat.max_mb = 1.0 is not allowed; download")


# -- 5. in-memory data is estimated before it is allocated ---------------------------------


def test_the_shard_stage_estimates_memory_before_loading():
    from pipeline.stages.shard import check_memory, in_memory_images

    s = validate(TINY | {"shard": TINY["shard"] | {"image_size": 4096}}, build=False).shard
    with pytest.raises(ParamError) as err:
        check_memory(s, in_memory_images(s))
    message = one_line(err)
    assert "1318 digits images at 4096x4096 hold about 22.1 GB in memory" in message
    assert "over the budget shard.max_gb = 16" in message
    check_memory(validate(TINY, build=False).shard, in_memory_images(s))  # 8x8: fits


@pytest.mark.slow
def test_a_huge_image_size_stops_the_shard_job_at_once(empty_study):
    write_params(empty_study, TINY | {"shard": TINY["shard"] | {"image_size": 4096}})
    start = time.perf_counter()
    proc = stage(empty_study, "shard")
    failed_cleanly(proc, "shard.image_size = 4096", "22.1 GB", "shard.max_gb = 16")
    assert time.perf_counter() - start < 60
    assert list((empty_study / "data").iterdir()) == []


# -- 6. a model header is checked against the model the study declares ---------------------


def test_a_teacher_headers_classes_and_options_must_be_the_studys(tmp_path):
    path = model_file(tmp_path / "t.safetensors", small_cnn(), num_classes=10**12)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_teacher(f"file:{path}", **SMALL)
    assert "header field num_classes is 1000000000000, expected 10" in one_line(err)
    with pytest.raises(CheckpointError, match="do not fit the model its header describes"):
        load_model(path)  # no expectation: its tensors still bound what is built
    path = model_file(tmp_path / "k.safetensors", small_cnn(), kwargs={"width": 10**6})
    with pytest.raises(CheckpointError, match=r"header field kwargs is \{'width': 1000000\}"):
        load_teacher(f"file:{path}", **SMALL, model_kwargs={"width": 4})
    with pytest.raises(CheckpointError, match="do not fit the model its header describes"):
        load_model(path)
    assert time.perf_counter() - start < 20  # nothing of that size was allocated


def test_a_teacher_header_naming_another_architecture_is_refused_before_building(tmp_path):
    path = model_file(tmp_path / "t.safetensors", small_cnn(), arch="timm:vit_huge_patch14_224")
    with pytest.raises(
        CheckpointError, match="holds a 'timm:vit_huge_patch14_224' model, not arch='small_cnn'"
    ):
        load_teacher(f"file:{path}", **SMALL)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (
            {"format": "kdiga-model/99"},
            "format 'kdiga-model/99', but this kdiga reads 'kdiga-model/2' only",
        ),
        ({"image_size": 4096000}, "header field image_size is 4096000, expected 8"),
        ({"in_chans": 3}, "header field in_chans is 3, expected 1"),
    ],
)
def test_a_stage_refuses_a_header_that_does_not_match_the_study(
    tmp_path, monkeypatch, header, match
):
    monkeypatch.chdir(tmp_path)
    params = validate(TINY, build=False)
    model = build_model("small_cnn", **params.data, width=8)
    model_file(tmp_path / "data" / "models" / "pgdat.safetensors", model, **header)
    with pytest.raises(CheckpointError, match=match):
        load_stage_model(params, "pgdat")
    with pytest.raises(CheckpointError, match=match.split(",")[0]):  # and as a file: teacher
        load_teacher(
            "file:data/models/pgdat.safetensors",
            arch="small_cnn",
            model_kwargs={"width": 8},
            **params.data,
        )


# -- 7. an ImageFolder's links and special files -------------------------------------------


@pytest.fixture
def image_folder(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "imagenet" / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / c / f"{i}.JPEG")
    return root


def test_a_class_folder_linking_to_the_root_of_the_filesystem_is_refused(image_folder):
    (image_folder / "a" / "everything").symlink_to("/")
    with pytest.raises(ShardError) as err:
        list_image_folder(image_folder)
    assert one_line(err).startswith(
        f"{image_folder / 'a' / 'everything'}: a symlink to the folder /;"
    )


def test_a_symlinked_class_folder_is_refused(image_folder):
    (image_folder / "c").symlink_to(image_folder / "a")
    with pytest.raises(
        ShardError,
        match=r"/c: a symlink to the folder .*symlinked folders are "
        "not followed",
    ):
        list_image_folder(image_folder)


def test_a_fifo_named_like_an_image_is_refused_without_opening_it(image_folder):
    os.mkfifo(image_folder / "b" / "2.JPEG")
    with pytest.raises(ShardError) as err:
        list_image_folder(image_folder)
    assert "2.JPEG: a FIFO (named pipe) named like an image, not a regular file" in one_line(err)


def test_links_to_files_are_read_inside_the_folder_and_refused_out_of_it(image_folder, tmp_path):
    (image_folder / "b" / "copy.JPEG").symlink_to(image_folder / "a" / "0.JPEG")
    samples, classes = list_image_folder(image_folder)
    assert classes == ["a", "b"] and len(samples) == 5
    outside = tmp_path / "outside.JPEG"
    shutil.copy(image_folder / "a" / "0.JPEG", outside)
    (image_folder / "b" / "out.JPEG").symlink_to(outside)
    with pytest.raises(
        ShardError,
        match=r"out\.JPEG: a symlink to .*outside\.JPEG, out of the "
        "ImageFolder",
    ):
        list_image_folder(image_folder)


# -- 8. a text file given as a checkpoint ---------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "weights.pt", "weights.safetensors"])
def test_a_text_file_is_not_a_checkpoint(tmp_path, name):
    text = tmp_path / name
    text.write_text("epoch 10: accuracy 0.93\n" * 20)
    link = tmp_path / "link.pt"
    link.symlink_to(text)
    for path in (text, link):
        with pytest.raises(CheckpointError) as err:
            load_teacher(f"file:{path}", **SMALL)
        message = one_line(err)
        assert "accepted: a safetensors file (a kdiga model file or a state_dict) or a " in message
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a model checkpoint: it is empty"):
        load_teacher(f"file:{tmp_path / 'empty.pt'}", **SMALL)


# -- 9. empty and unknown model names ------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "value", "key"),
    [
        ("teacher", "timm:", "teachers.pgdat.source"),
        ("teacher", "file:", "teachers.pgdat.source"),
        ("arch", "timm:", "students.small_cnn.arch"),
        ("arch", "torchvision:", "students.small_cnn.arch"),
        ("init", "file:", "students.small_cnn.init"),
    ],
)
def test_an_empty_model_name_is_refused_at_validation(where, value, key):
    raw = copy.deepcopy(TINY)
    if where == "teacher":
        raw["teachers"]["pgdat"] = {"source": value, "arch": "small_cnn"}
    else:
        raw["students"]["small_cnn"][where] = value
    with pytest.raises(ParamError) as err:
        validate(raw, build=False)
    assert one_line(err).startswith(f"params: {key} = {value!r} is not allowed; name ")


def test_an_unknown_timm_teacher_is_one_line_naming_its_key():
    from pipeline.stages.teacher import _fetch

    raw = copy.deepcopy(TINY)
    raw["teachers"]["pgdat"] = {"source": "timm:nonexistent_model_xyz"}
    params = validate(raw, build=False)
    with pytest.raises(ParamError) as err:
        _fetch("pgdat", params.teachers["pgdat"], params.data)
    message = one_line(err)
    assert message.startswith("params: teachers.pgdat.source = 'timm:nonexistent_model_xyz' ")
    assert "unknown timm model 'nonexistent_model_xyz'" in message


# -- 10. messages that name the right key and say what a path is ---------------------------


def test_a_students_wrong_sha256_names_the_students_key(tmp_path):
    from pipeline.stages.distill import build_student

    path = tmp_path / "init.safetensors"
    save_model(small_cnn(width=8), path)
    raw = copy.deepcopy(TINY)
    raw["students"]["small_cnn"] |= {"init": f"file:{path}", "sha256": "0" * 64}
    params = validate(raw, build=False)
    with pytest.raises(CheckpointError) as err:
        build_student(params, parse_student_id(params, ST), params.data)
    assert "check students.small_cnn.sha256 and the file" in one_line(err)


@pytest.mark.parametrize(
    ("path", "kind"), [("DIR", "a directory"), ("/dev/null", "a character device")]
)
def test_a_checkpoint_path_that_is_not_a_file_says_what_it_is(tmp_path, path, kind):
    path = str(tmp_path) if path == "DIR" else path
    raw = copy.deepcopy(TINY)
    raw["students"]["small_cnn"]["init"] = f"file:{path}"
    raw["teachers"]["pgdat"] = {"source": f"file:{path}", "arch": "small_cnn"}
    params = validate(raw, build=False)
    for stages, key in (
        (("teacher",), "teachers.pgdat.source"),
        (("distill",), "students.small_cnn.init"),
    ):
        with pytest.raises(ParamError) as err:
            check_paths(params, stages)
        assert f"{key} = {path!r} is not allowed; it is {kind}, not a file" in one_line(err)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is {kind}, not a file"):
        load_teacher(f"file:{path}", **SMALL)


# -- 11. shards altered with their manifest ------------------------------------------------


def _set_member_size(shard: Path, size: int) -> None:
    """Declare ``size`` bytes in the first member's tar header (base-256), checksum fixed."""
    data = bytearray(shard.read_bytes())
    block = data[:512]
    block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    data[:512] = block
    shard.write_bytes(bytes(data))


def _shards(tmp_path: Path, labels: list[int], **info) -> Path:
    x = torch.randint(0, 255, (len(labels), 1, 8, 8), dtype=torch.uint8)
    entries = write_shards(x, torch.tensor(labels), tmp_path, prefix="train")
    manifest = tmp_path / "train.json"
    write_manifest(
        entries,
        manifest,
        dataset="digits",
        split="train",
        image_size=8,
        channels=1,
        num_classes=10,
        **info,
    )
    return manifest


def test_a_member_declaring_a_huge_size_is_refused_before_reading(tmp_path):
    manifest = _shards(tmp_path, [1, 2, 3])
    shard = tmp_path / "train-000000.tar"
    _set_member_size(shard, 10**12)
    with pytest.raises(ShardError) as err:
        read_shards([shard])
    assert "declares 1000000000000 bytes, more than the" in one_line(err)
    from kdiga.stream.tar import read_shard

    with pytest.raises(ShardError, match="declares 1000000000000 bytes at byte 0, more than"):
        list(read_shard(str(shard), 3))
    assert manifest.exists()


@pytest.mark.parametrize("label", [-5, 99])
def test_a_label_outside_the_classes_is_refused_naming_shard_and_sample(tmp_path, label):
    manifest = _shards(tmp_path, [1, label, 3])
    with pytest.raises(ShardError) as err:
        load_sharded(manifest)
    message = one_line(err)
    assert message.startswith(f"{tmp_path / 'train-000000.tar'}: sample '000000001' ")
    assert f"label {label} is not a class of this data (0 to 9)" in message


def test_an_image_shard_label_outside_the_classes_is_refused(tmp_path, image_folder):
    files = sorted(image_folder.rglob("*.JPEG"))
    samples = ((f.read_bytes(), "jpg", 99 if i == 2 else 0) for i, f in enumerate(files))
    entries = write_encoded_shards(samples, tmp_path, prefix="test")
    manifest = tmp_path / "test.json"
    write_manifest(
        entries,
        manifest,
        dataset="imagenet",
        split="test",
        encoding="image",
        image_size=16,
        channels=3,
        num_classes=2,
    )
    with pytest.raises(
        ShardError,
        match=r"sample '000000002': label 99 is not a class of this "
        r"data \(0 to 1\)",
    ):
        load_image_split(manifest)
