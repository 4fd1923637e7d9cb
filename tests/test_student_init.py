"""A student's init: from scratch, from pretrained weights (a clear error offline), or from a
checkpoint file checked against its sha256; its seed makes its init."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_study import TINY

from kdiga.files import sha256_file
from kdiga.models import CheckpointError, build_model, save_model
from pipeline.params import parse_student_id, validate
from pipeline.stages.distill import build_student

INFO = {"num_classes": 10, "in_chans": 1, "image_size": 8}


def _params(**student):
    raw = copy.deepcopy(TINY)
    raw["students"]["small_cnn"] |= student
    raw["seeds"] = [0, 1]
    return validate(raw)


def _job(params, seed=0):
    return parse_student_id(params, f"st--small_cnn--s{seed}")


def test_a_file_init_loads_its_weights_and_trains_them(tmp_path):
    source = build_model("small_cnn", **INFO, width=8)
    path = tmp_path / "init.safetensors"
    save_model(source, path)
    params = _params(init=f"file:{path}", sha256=sha256_file(path))
    model = build_student(params, _job(params), INFO)
    for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(p.requires_grad for p in model.parameters())


def test_a_file_init_with_another_sha256_is_refused(tmp_path):
    path = tmp_path / "init.safetensors"
    save_model(build_model("small_cnn", **INFO, width=8), path)
    params = _params(init=f"file:{path}", sha256="0" * 64)
    with pytest.raises(Exception, match="sha256"):
        build_student(params, _job(params), INFO)


def test_pretrained_weights_unavailable_is_one_clear_error(monkeypatch):
    from pipeline.stages import distill

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise RuntimeError("could not download weights for timm:resnet18 (offline)")
        return build_model(*args, **kwargs)

    raw = copy.deepcopy(TINY)
    raw["shard"] |= {"dataset": "synthetic", "image_size": 32}
    raw["teachers"]["pgdat"]["arch_kwargs"] = {}
    raw["students"] = {"r18": {"arch": "timm:resnet18", "init": "pretrained", "lr": 1e-5}}
    params = validate(raw)
    monkeypatch.setattr(distill, "build_model", offline)  # the name build_student calls
    with pytest.raises(
        CheckpointError,
        match=r"students\.r18: pretrained weights for "
        r"timm:resnet18 are not available \(could not download",
    ):
        build_student(params, parse_student_id(params, "st--r18--s0"), INFO | {"in_chans": 3})


def test_the_seed_makes_the_init():
    from kdiga.utils import seed_everything

    params = _params()
    inits = []
    for seed in (0, 1, 0):
        seed_everything(seed)
        inits.append(build_student(params, _job(params, seed), INFO).state_dict())
    first, other, again = (torch.cat([v.flatten().float() for v in s.values()]) for s in inits)
    assert torch.equal(first, again) and not torch.equal(first, other)
