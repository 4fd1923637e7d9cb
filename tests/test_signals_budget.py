"""The signals stage states its file's size before computing anything and refuses one over
``signals.max_gb``: the size formula against real files, the refusal and its exit code."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml

from kdiga.models import build_model
from kdiga.shards import write_manifest
from kdiga.signals import compute_signals, save_signals, signals_nbytes
from pipeline.params import ParamError, Signals, read_yaml
from pipeline.stages import signals as stage

ROOT = Path(__file__).resolve().parents[1]


def _tensor_bytes(path: Path) -> int:
    """The bytes of a safetensors file after its header: the stored tensors."""
    with open(path, "rb") as fh:
        (header,) = struct.unpack("<Q", fh.read(8))
        entries = json.loads(fh.read(header))
    size = path.stat().st_size - 8 - header
    ends = [e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"]
    assert max(ends) == size  # nothing but tensors after the header
    return size


@pytest.mark.parametrize(
    ("grad_dtype", "shape", "classes"),
    [("float16", (1, 8, 8), 10), ("float32", (3, 6, 6), 7), ("bfloat16", (2, 5, 5), 4)],
)
def test_size_is_the_bytes_of_a_written_file(tmp_path, grad_dtype, shape, classes):
    n, views = 9, 3
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    teacher = build_model("small_cnn", classes, in_chans=shape[0], image_size=shape[1])
    signal_set = compute_signals(
        teacher,
        images,
        labels,
        views=views,
        augment="crop_flip",
        crop_padding=1,
        batch_size=4,
        grad_dtype=grad_dtype,
    )
    path = tmp_path / "signals.safetensors"
    save_signals(signal_set, path)
    assert signals_nbytes(views, n, shape, classes, grad_dtype) == _tensor_bytes(path)


def test_size_grows_with_each_factor():
    one = signals_nbytes(1, 1, (3, 32, 32), 10, "float16")
    assert signals_nbytes(4, 1, (3, 32, 32), 10, "float16") == 4 * one
    assert signals_nbytes(1, 5, (3, 32, 32), 10, "float16") == 5 * one
    # float32 stores 2 more bytes per pixel and no per-sample scale (4 bytes)
    assert signals_nbytes(1, 1, (3, 32, 32), 10, "float32") == one + 2 * 3 * 32 * 32 - 4
    with pytest.raises(ValueError, match="grad_dtype"):
        signals_nbytes(1, 1, (3, 32, 32), 10, "int8")


def test_imagenet_preset_is_refused_with_size_budget_and_key():
    raw = read_yaml(ROOT / "configs" / "imagenet.yaml")["signals"]
    sig = Signals(**raw)  # the preset's own settings; max_gb at its default
    n, shape = 1_281_167, (3, 224, 224)
    gb = signals_nbytes(sig.views, n, shape, 1000, sig.grad_dtype) / 1e9
    assert gb > 6000  # 16 views x 1.28M x 3 x 224 x 224 x 2 bytes: about 6.2 TB
    with pytest.raises(ParamError) as err:
        stage.check_size(sig, "vit_l16", n, shape, 1000)
    text = str(err.value)
    assert err.value.key == "signals.max_gb" and err.value.value == sig.max_gb
    assert f"{gb:,.2f} GB" in text and f"budget of {sig.max_gb:g} GB" in text
    assert "raise signals.max_gb" in text and "16 views x 1,281,167 images x 3 x 224 x 224" in text


def test_within_budget_gives_the_bytes():
    sig = Signals(views=16, grad_dtype="float16", max_gb=20.0)
    nbytes = stage.check_size(sig, "trades", 49_000, (3, 32, 32), 10)
    assert nbytes == signals_nbytes(16, 49_000, (3, 32, 32), 10, "float16")
    assert nbytes / 1e9 < 20


def test_stage_refuses_before_reading_images_or_teacher(tmp_path, monkeypatch, capsys):
    """Over budget: exit 2 with the one-line error; no shard, teacher or provenance is read
    (none exists here), only the training manifest."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["signals"] |= {"enabled": True, "max_gb": 0.001}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    entry = {"path": str(shards / "train-000000.tar"), "count": 958, "sha256": "0" * 64}
    write_manifest(
        [entry],
        shards / "train.json",
        dataset="digits",
        split="train",
        image_size=16,
        channels=1,
        num_classes=10,
    )
    assert stage.main(["--params", "params.yaml", "--teacher", "pgdat"]) == 2
    err = capsys.readouterr().err
    size = signals_nbytes(16, 958, (1, 16, 16), 10, "float16") / 1e9
    assert "signals failed: params: signals.max_gb = 0.001 is not allowed" in err
    assert f"{size:,.2f} GB" in err and "16 views x 958 images x 1 x 16 x 16" in err
