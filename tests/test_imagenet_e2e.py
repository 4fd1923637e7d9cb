"""ImageNet's code path end to end, on a synthetic ImageFolder of JPEGs, as a user runs it.

The params are ``configs/imagenet.yaml`` with only sizes changed (and its offline-unavailable
timm teachers left out): 10 classes of 64x64 JPEGs instead of 1000 of full-size ones, 32 px
views, one epoch, a ResNet-18 file teacher and student, short attacks. Snakemake runs every
stage in a fresh git + DVC repo: the shard stage writes the original JPEG bytes, the teacher
is loaded from its file, the students train streamed from the shards by 2 DataLoader workers,
the attacks and bounds read the test subset from the shards, and the report is written.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from tiny_study import ROOT, build_once, new_study

pytestmark = pytest.mark.slow

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIDE = 10, 60, 10, 64


def _jpeg(label: int, k: int) -> bytes:
    """A 64x64 JPEG whose colour and stripes say its class (learnable in one epoch)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(label * 1000 + k)
    base = torch.tensor([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
    img = base.view(3, 1, 1).float() + 40 * torch.randn(3, SIDE, SIDE, generator=gen)
    img[:, :: 2 + label % 4] += 60
    pixels = img.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_image_folder(root: Path) -> Path:
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                offset = 0 if split == "train" else 10_000
                (folder / f"img_{k:04d}.JPEG").write_bytes(_jpeg(c, offset + k))
    return root


def imagenet_params(images: Path, teacher_file: Path) -> dict:
    """configs/imagenet.yaml with its sizes shrunk to the synthetic folder."""
    p = yaml.safe_load((ROOT / "configs" / "imagenet.yaml").read_text())
    p["shard"] |= {
        "root": str(images),
        "num_classes": CLASSES,
        "image_size": 32,
        "val_fraction": 0.1,
        "test_samples": 40,
        "max_per_shard": 100,
        "workers": 2,
        "shuffle_buffer": 64,
    }
    teacher = p["teachers"]["resnet50_at"]
    teacher |= {"source": f"file:{teacher_file}", "arch": "torchvision:resnet18"}
    p["teachers"] = {"resnet50_at": teacher}
    p["students"] = {"resnet18": p["students"]["resnet18"]}
    p["distill"] |= {
        "epochs": 1,
        "batch_size": 32,
        "milestones": [],
        "lr": 0.05,
        "adversarial": {"eps": "4/255", "steps": 1, "step_size": None},
    }
    p["attack"] |= {"radii": [0.005, 0.01], "batch_size": 40}
    p["attack"]["pgd"]["steps"] = 3
    p["attack"]["autoattack"] |= {
        "version": "custom",
        "attacks": ["apgd-ce"],
        "n_iter": 5,
        "n_restarts": 1,
    }
    p["bounds"] |= {
        "radii": [0.005],
        "samples": 20,
        "steps": 2,
        "restarts": 1,
        "check_samples": 10,
        "batch_size": 20,
    }
    return p


def _build(base: Path) -> None:
    from torchvision.models import resnet18

    images = make_image_folder(base / "images")
    teacher_file = base / "teacher.pt"
    torch.manual_seed(0)
    torch.save(resnet18(num_classes=CLASSES).state_dict(), teacher_file)
    new_study(base / "study", params=imagenet_params(images, teacher_file))


@pytest.fixture(scope="session")
def study(shared_root) -> Path:
    """The study, built once per run (whichever worker asks first); the tests only read it."""
    return build_once(shared_root, "imagenet", _build) / "study"


def test_shards_hold_the_original_jpeg_bytes(study):
    manifest = json.loads((study / "data" / "shards" / "test.json").read_text())
    assert manifest["encoding"] == "image" and manifest["num_samples"] == 40
    assert manifest["num_classes"] == CLASSES and manifest["image_size"] == 32
    images = Path(yaml.safe_load((study / "params.yaml").read_text())["shard"]["root"])
    originals = {p.read_bytes() for p in (images / "val").rglob("*.JPEG")}
    shard = study / "data" / "shards" / manifest["shards"][0]["path"]
    with tarfile.open(shard) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert jpegs and all(j in originals for j in jpegs)
    train = json.loads((study / "data" / "shards" / "train.json").read_text())
    val = json.loads((study / "data" / "shards" / "val.json").read_text())
    assert train["num_samples"] + val["num_samples"] == CLASSES * TRAIN_PER_CLASS
    assert val["class_counts"] == [round(0.1 * TRAIN_PER_CLASS)] * CLASSES


def test_every_stage_ran_and_the_report_has_every_model(study):
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    models = (
        "resnet50_at",
        "st--resnet18--s0",
        "resnet50_at--kd--resnet18--s0",
        "resnet50_at--kdiga--resnet18--s0",
    )
    for mid in models:
        clean = metrics[mid]["clean"]
        assert 0 <= metrics[mid]["pgd"]["0.01"] <= clean <= 1, (mid, metrics[mid])
    assert "bounds" in metrics["resnet50_at--kdiga--resnet18--s0"]
    for mid in models[1:]:  # one streamed epoch of 540 // 32 = 16 steps, then validation
        log = (study / "logs" / "distill" / f"{mid}.log").read_text()
        assert "epoch 1/1" in log and "val_acc=" in log, log[-2000:]
