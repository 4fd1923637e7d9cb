"""Tests for kdiga.teachers: file / url / timm sources, sha256 checks, the raw and
RobustBench-style checkpoint layouts, the url cache, clear errors offline, TeacherMeta."""

from __future__ import annotations

import argparse
import fractions
import os
import pickle
import shlex
import socket

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdiga.files import sha256_file
from kdiga.models import CheckpointError, build_model, save_model
from kdiga.teachers import TeacherMeta, cache_path, freeze, load_teacher, split_checkpoint

WRN = {"depth": 10, "widen_factor": 2}


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Fail every connection at once, put the HF hub offline, empty weight caches."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))


def wrn(mean=None, std=None):
    """A tiny TRADES-layout WRN with random weights and BN statistics, eval mode."""
    model = build_model("wrn_34_10", 10, mean=mean, std=std, **WRN).eval()
    with torch.no_grad():
        for name, t in model.net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t))
    return model


def assert_same_function(a, b):
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def assert_frozen(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- metadata, freeze


metas = st.builds(
    TeacherMeta,
    arch=st.sampled_from(["wrn_34_10", "timm:vit_small_patch16_224"]),
    num_classes=st.integers(1, 1000),
    in_chans=st.just(3),
    image_size=st.integers(8, 224),
    mean=st.tuples(*[st.floats(0, 1)] * 3),
    std=st.tuples(*[st.floats(0.01, 1)] * 3),
    source=st.text(min_size=1, max_size=20),
    sha256=st.none() | st.text("0123456789abcdef", min_size=64, max_size=64),
    clean_acc=st.none() | st.floats(0, 1),
    robust_acc=st.none() | st.dictionaries(st.text(max_size=12), st.floats(0, 1), max_size=4),
)


@settings(max_examples=40, deadline=None)
@given(meta=metas)
def test_meta_round_trip(meta):
    data = meta.to_dict()
    assert isinstance(data["mean"], list)
    assert TeacherMeta.from_dict(data) == meta


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update({"colour": 1}), "unknown keys \\['colour'\\]"),
        (lambda d: d.pop("arch"), "missing keys \\['arch'\\]"),
    ],
)
def test_meta_from_dict_rejects_bad_keys(edit, match):
    data = TeacherMeta("a", 10, 3, 32, (0.0,) * 3, (1.0,) * 3, "file:x").to_dict()
    edit(data)
    with pytest.raises(ValueError, match=match):
        TeacherMeta.from_dict(data)


def test_freeze():
    model = build_model("small_cnn", 10, width=2).train()
    assert freeze(model) is model
    assert_frozen(model)


# ----------------------------------------------------------------------------- file:


def test_file_kdiga_model_with_metadata(tmp_path):
    model = wrn(mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1])
    path = tmp_path / "t.pt"
    save_model(model, path, meta={"clean_acc": 0.8, "robust_acc": {"pgd@0.1": 0.5}})
    teacher, meta = load_teacher(f"file:{path}", sha256=sha256_file(path))
    assert_frozen(teacher)
    assert_same_function(teacher, model)
    assert meta.arch == "wrn_34_10" and meta.source == f"file:{path}"
    assert meta.sha256 == sha256_file(path)
    assert meta.mean == pytest.approx((0.1, 0.2, 0.3)) and meta.std == pytest.approx(
        (0.3, 0.2, 0.1)
    )
    assert (meta.clean_acc, meta.robust_acc) == (0.8, {"pgd@0.1": 0.5})


def test_file_wrong_sha256(tmp_path):
    path = tmp_path / "t.pt"
    save_model(wrn(), path)
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"expected {wrong}, actual {sha256_file(path)}"):
        load_teacher(f"file:{path}", sha256=wrong)


def test_file_kdiga_model_arch_must_match(tmp_path):
    path = tmp_path / "t.pt"
    save_model(wrn(), path)
    with pytest.raises(ValueError, match="holds a 'wrn_34_10' model, not arch='resnet18'"):
        load_teacher(f"file:{path}", arch="resnet18")


def test_missing_file_names_path_and_what_to_give(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match=r"absent\.pt.*arch="):
        load_teacher(f"file:{path}", arch="wrn_34_10")


def _trades_file(model):
    """A state_dict as the TRADES code saves it: bare, with the unused sub_block1 copy."""
    sd = dict(model.net.state_dict())
    sd.update({"sub_block1." + k[7:]: v.clone() for k, v in sd.items() if k.startswith("block1.")})
    return sd


def _module_prefixed(model):
    return {"state_dict": {"module." + k: v for k, v in model.net.state_dict().items()}, "epoch": 7}


@pytest.mark.parametrize(
    "layout",
    [
        lambda m: m.net.state_dict(),
        _trades_file,
        _module_prefixed,
        lambda m: {"net": m.net.state_dict(), "acc": 0.5},
    ],
    ids=["bare", "trades", "module_prefix", "net_key"],
)
def test_file_raw_checkpoint_layouts(tmp_path, layout):
    model = wrn()
    path = tmp_path / "raw.pt"
    torch.save(layout(model), path)
    teacher, meta = load_teacher(f"file:{path}", arch="wrn_34_10", model_kwargs=WRN)
    assert_frozen(teacher)
    assert_same_function(teacher, model)
    assert meta.mean == (0.0, 0.0, 0.0) and meta.std == (1.0, 1.0, 1.0)
    assert meta.sha256 == sha256_file(path)


def test_file_robustness_library_layout(tmp_path):
    """Engstrom et al.'s robustness library: module.model.* net, module.attacker.* copies,
    module.normalizer.new_mean/new_std [3, 1, 1] holding the input normalisation."""
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    model = wrn(mean=mean, std=std)
    sd = {}
    for k, v in model.net.state_dict().items():
        sd["module.model." + k] = v
        sd["module.attacker.model." + k] = torch.zeros_like(v)
    for prefix in ("module.normalizer.", "module.attacker.normalize."):
        sd[prefix + "new_mean"] = torch.tensor(mean).view(3, 1, 1)
        sd[prefix + "new_std"] = torch.tensor(std).view(3, 1, 1)
    path = tmp_path / "robustness.pt"
    torch.save({"model": sd, "epoch": 150, "schedule": None}, path)
    teacher, meta = load_teacher(f"file:{path}", arch="wrn_34_10", model_kwargs=WRN)
    assert meta.mean == pytest.approx(tuple(mean)) and meta.std == pytest.approx(tuple(std))
    assert_same_function(teacher, model)


def test_robustbench_normalize_layout():
    net = {"conv1.weight": torch.zeros(1)}
    obj = {"normalize.mean": torch.full((1, 3, 1, 1), 0.5), "normalize.std": torch.ones(1, 3)}
    obj.update({"model." + k: v for k, v in net.items()})
    state, mean, std = split_checkpoint(obj)
    assert list(state) == ["conv1.weight"]
    assert (mean, std) == ([0.5] * 3, [1.0] * 3)


def test_pickled_objects_are_refused_even_with_sha256(tmp_path):
    model = wrn()
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": model.net.state_dict(), "lr": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pt.*sha256"):
        load_teacher(f"file:{path}", arch="wrn_34_10", model_kwargs=WRN)
    with pytest.raises(CheckpointError, match=r"pickled\.pt.*fractions\.Fraction.*clean\.pt"):
        load_teacher(f"file:{path}", arch="wrn_34_10", model_kwargs=WRN, sha256=sha256_file(path))


# ----------------------------------------------------------------------------- no code runs

CNN = dict(arch="small_cnn", num_classes=10, in_chans=1, image_size=8)


class _Payload:
    """Unpickling this runs ``touch marker``: harmless, but it shows that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _write_plain_pickle(obj, path):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


WRITERS = {
    "torch_zip": torch.save,
    "torch_legacy": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    "plain_pickle": _write_plain_pickle,
}


@pytest.mark.parametrize("via", ["file", "url"])
@pytest.mark.parametrize("pinned", [False, True], ids=["no_sha256", "sha256"])
@pytest.mark.parametrize("fmt", list(WRITERS))
def test_malicious_checkpoint_runs_no_code(tmp_path, fmt, pinned, via):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    sd = build_model("small_cnn", 10, in_chans=1, image_size=8).net.state_dict()
    WRITERS[fmt]({"state_dict": sd, "args": _Payload(marker)}, path)
    digest = sha256_file(path) if pinned else None
    cache = tmp_path / "cache"
    source = f"file:{path}" if via == "file" else f"url:{path.as_uri()}"
    if via == "url" and not pinned:
        with pytest.raises(ValueError, match="url sources need sha256"):
            load_teacher(source, sha256=digest, cache_dir=cache, **CNN)
        assert not marker.exists()
        return
    with pytest.raises(CheckpointError) as info:
        load_teacher(source, sha256=digest, cache_dir=cache, **CNN)
    assert not marker.exists(), "the checkpoint's pickled code ran"
    message = str(info.value)
    loaded = path if via == "file" else cache_path(path.as_uri(), digest, cache)
    assert "\n" not in message and message.startswith(f"{loaded}: refused to load")
    offending = "plain pickle" if fmt == "plain_pickle" else f"{os.system.__module__}.system"
    assert offending in message
    assert "kdiga never unpickles code" in message
    assert 'torch.save(obj["state_dict"], "clean.pt")' in message
    assert "safetensors.torch.save_file(state_dict, " in message and "file:" in message


@pytest.mark.parametrize("pinned", [False, True], ids=["no_sha256", "sha256"])
@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy"])
def test_checkpoint_with_args_namespace_and_numpy_scalars_loads(tmp_path, fmt, pinned):
    """Research checkpoints store their ``args`` and numpy metrics next to the weights."""
    model = build_model("small_cnn", 10, in_chans=1, image_size=8).eval()
    path = tmp_path / "research.pt"
    obj = {
        "state_dict": model.net.state_dict(),
        "args": argparse.Namespace(lr=0.1, arch="small_cnn", milestones=[75, 90]),
        "best_acc": np.float64(0.5),
        "epoch": np.int64(3),
        "loss": np.float32(1.25),
        "ema": np.bool_(True),
    }
    WRITERS[fmt](obj, path)
    digest = sha256_file(path) if pinned else None
    teacher, meta = load_teacher(f"file:{path}", sha256=digest, **CNN)
    assert meta.sha256 == sha256_file(path)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(teacher(x), model(x), rtol=0, atol=0)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # not global


def test_raw_checkpoint_errors(tmp_path):
    path = tmp_path / "raw.pt"
    torch.save(wrn().net.state_dict(), path)
    with pytest.raises(ValueError, match="arch="):
        load_teacher(f"file:{path}")
    with pytest.raises(ValueError, match="unknown model 'wrn_99'"):
        load_teacher(f"file:{path}", arch="wrn_99")
    with pytest.raises(CheckpointError, match=r"raw\.pt.*do not fit 'wrn_34_10'"):
        load_teacher(f"file:{path}", arch="wrn_34_10", model_kwargs={"depth": 16})
    with pytest.raises(CheckpointError, match=r"raw\.pt.*do not fit 'resnet18'"):
        load_teacher(f"file:{path}", arch="resnet18")
    with pytest.raises(CheckpointError, match="not a kdiga model file"):
        load_teacher(f"file:{path}", checkpoint_format="kdiga")
    torch.save({"optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="no state_dict found"):
        load_teacher(f"file:{path}", arch="wrn_34_10", model_kwargs=WRN)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"raw\.pt"):
        load_teacher(f"file:{path}", arch="wrn_34_10", model_kwargs=WRN)


# ----------------------------------------------------------------------------- url:


def test_url_downloads_once_then_uses_the_cache(tmp_path):
    model = wrn()
    src = tmp_path / "src" / "model_cifar_wrn.pt"
    src.parent.mkdir()
    torch.save(model.net.state_dict(), src)
    digest = sha256_file(src)
    url, cache = src.as_uri(), tmp_path / "cache"
    kwargs = dict(arch="wrn_34_10", model_kwargs=WRN, sha256=digest, cache_dir=cache)
    teacher, meta = load_teacher(f"url:{url}", **kwargs)
    assert_same_function(teacher, model)
    assert meta.sha256 == digest and meta.source == f"url:{url}"
    cached = cache_path(url, digest, cache)
    assert cached.is_file() and sha256_file(cached) == digest
    assert [p.name for p in cache.iterdir()] == [cached.name]  # no temporary left behind
    src.unlink()  # the second load must not need the source
    teacher2, _ = load_teacher(f"url:{url}", **kwargs)
    assert_same_function(teacher2, model)


def test_url_wrong_sha256_leaves_nothing_in_cache(tmp_path):
    src = tmp_path / "w.pt"
    torch.save(wrn().net.state_dict(), src)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"expected {'1' * 64}, actual {sha256_file(src)}"):
        load_teacher(f"url:{src.as_uri()}", arch="wrn_34_10", sha256="1" * 64, cache_dir=cache)
    assert not any(cache.iterdir())


def test_url_needs_sha256(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        load_teacher("url:https://example.org/w.pt", arch="wrn_34_10", cache_dir=tmp_path)


def test_unreachable_url_says_where_to_put_the_file(tmp_path):
    url, digest = "https://127.0.0.1:9/model_cifar_wrn.pt", "a" * 64
    expected_path = cache_path(url, digest, tmp_path)
    with pytest.raises(RuntimeError, match="could not reach") as info:
        load_teacher(f"url:{url}", arch="wrn_34_10", sha256=digest, cache_dir=tmp_path, timeout=5)
    assert url in str(info.value) and str(expected_path) in str(info.value)
    assert "file:" in str(info.value)


# ----------------------------------------------------------------------------- timm:


def test_timm_pretrained_offline_is_a_clear_error(no_network):
    with pytest.raises(RuntimeError, match=r"timm:vit_tiny_patch16_224.*could not be downloaded"):
        load_teacher("timm:vit_tiny_patch16_224")


def test_timm_with_local_weights(tmp_path, no_network):
    kwargs = {"patch_size": 8, "depth": 2}
    model = build_model("timm:vit_tiny_patch16_224", 10, **kwargs).eval()
    path = tmp_path / "vit.pt"
    torch.save(model.net.state_dict(), path)
    teacher, meta = load_teacher("timm:vit_tiny_patch16_224", weights=path, model_kwargs=kwargs)
    assert_frozen(teacher)
    assert meta.mean == (0.5, 0.5, 0.5) and meta.std == (0.5, 0.5, 0.5)  # timm's config
    assert meta.sha256 == sha256_file(path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), model.net((x - 0.5) / 0.5))


# ----------------------------------------------------------------------------- bad sources


@pytest.mark.parametrize(
    ("source", "kwargs", "match"),
    [
        ("s3:bucket/w.pt", {}, "allowed: 'file:<path>', 'url:<https://...>', 'timm:<name>'"),
        ("model.pt", {}, "allowed"),
        ("file:", {}, "allowed"),
        ("train:pgd_at", {}, "pipeline"),
        ("file:x.pt", {"checkpoint_format": "onnx"}, "checkpoint_format"),
        ("file:x.pt", {"sha256": "abc"}, "64 hex digits"),
        ("url:ftp://host/w.pt", {"sha256": "b" * 64}, "scheme 'ftp'"),
        ("url:http://host/w.pt", {"sha256": "b" * 64}, r"plain http is refused; use .*https://"),
        ("timm:no_such_model_xyz", {}, "unknown timm model"),
        ("file:x.pt", {"weights": "w.pt"}, "weights= is for 'timm:'"),
        ("timm:vit_tiny_patch16_224", {"arch": "resnet18"}, "not arch='resnet18'"),
    ],
)
def test_bad_sources(source, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_teacher(source, cache_dir=tmp_path, **kwargs)
