"""kdiga.signals: cached teacher signals equal live ones at the exact x the student sees."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdiga.data import augment, load_dataset, to_float
from kdiga.losses import teacher_signals
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.signals import (
    SignalCache,
    SignalError,
    SignalMismatchError,
    apply_views,
    compute_signals,
    load_signals,
    module_sha256,
    save_signals,
    view_params,
)
from kdiga.train import TrainConfig, fit

N, CLASSES, SIZE = 40, 5, 8
ROOT = Path(__file__).resolve().parents[1]


def tiny_teacher() -> nn.Module:
    """Conv + BatchNorm (non-trivial running stats) + linear; eval mode must be honoured."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, CLASSES),
    )
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net.train()  # left in train mode on purpose


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "train", image_size=SIZE, n=N, num_classes=CLASSES, seed=3)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def sigset(data, teacher):
    x, y = data
    return compute_signals(
        teacher, x, y, views=4, augment="crop_flip", crop_padding=2, seed=7, batch_size=16
    )


@pytest.mark.parametrize(("kind", "padding"), [("crop", 2), ("crop_flip", 2), ("crop_flip", 0)])
def test_views_are_data_augment_draws(data, kind, padding):
    x = to_float(data[0])
    for v in (1, 2):
        offsets, flips = view_params(N, v, kind, padding, seed=5)
        gen = torch.Generator().manual_seed(5 * 1000003 + v)
        assert torch.equal(
            apply_views(x, offsets, flips, padding), augment(x, kind, gen, padding=padding)
        )
    offsets, flips = view_params(N, 0, kind, padding, seed=5)  # view 0: the clean image
    assert torch.equal(apply_views(x, offsets, flips, padding), x)
    a = apply_views(x, *view_params(N, 1, kind, padding, seed=5), padding)
    b = apply_views(x, *view_params(N, 2, kind, padding, seed=5), padding)
    assert not torch.equal(a, b)


@settings(max_examples=8, deadline=None)
@given(epoch=st.integers(0, 20), batch=st.lists(st.integers(0, N - 1), min_size=1, max_size=12))
def test_cached_signals_equal_live_at_the_view(data, teacher, sigset, epoch, batch):
    x_all, y_all = data
    cache = SignalCache(sigset, x_all, y_all, seed=epoch % 3, schedule="random")
    idx = torch.tensor(batch)
    x, cached = cache(idx, epoch)
    live = teacher_signals(teacher, x, y_all[idx])
    assert teacher.training  # the mode was restored; the signals used eval mode
    torch.testing.assert_close(cached.logits, live.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.input_grad, live.input_grad, rtol=1e-5, atol=1e-5)
    assert x.min() >= 0 and x.max() <= 1 and x.shape == (len(batch), 3, SIZE, SIZE)


def test_take_views_equals_computing_fewer(data, teacher, sigset, tmp_path):
    two = compute_signals(
        teacher, *data, views=2, augment="crop_flip", crop_padding=2, seed=7, batch_size=16
    )
    taken = sigset.take_views(2)
    for name in ("offsets", "flips", "logits", "grads"):
        assert torch.equal(getattr(taken, name), getattr(two, name)), name
    assert taken.meta == two.meta
    save_signals(taken, tmp_path / "t.pt")
    assert load_signals(tmp_path / "t.pt").views == 2
    with pytest.raises(ValueError, match="k must be"):
        sigset.take_views(5)


def test_cycle_schedule_visits_every_view(data, sigset):
    cache = SignalCache(sigset, *data, seed=1)
    idx = torch.arange(N)
    seen = torch.stack([cache.views_for(idx, e) for e in range(3, 3 + sigset.views)])
    assert torch.equal(seen.sort(dim=0).values, torch.arange(4)[:, None].expand(4, N))
    assert len(set(cache.views_for(idx, 0).tolist())) > 1  # a batch mixes views
    other = SignalCache(sigset, *data, seed=2)
    assert not torch.equal(cache.views_for(idx, 0), other.views_for(idx, 0))
    rand = SignalCache(sigset, *data, seed=1, schedule="random")
    assert torch.equal(rand.views_for(idx, 5), rand.views_for(idx, 5))
    assert not torch.equal(rand.views_for(idx, 5), rand.views_for(idx, 6))


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, data, teacher, sigset, mmap):
    path = tmp_path / "signals.pt"
    save_signals(sigset, path)
    back = load_signals(path, mmap=mmap, teacher_sha256=module_sha256(teacher), n=N)
    for name in ("offsets", "flips", "logits", "grads"):
        assert torch.equal(getattr(back, name), getattr(sigset, name)), name
    assert back.grad_scale is None and back.meta["views"] == 4
    assert back.meta["teacher_sha256"] == sigset.meta["teacher_sha256"]
    idx = torch.tensor([3, 1, 4])
    a, b = SignalCache(back, *data)(idx, 2), SignalCache(sigset, *data)(idx, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].input_grad, b[1].input_grad)


class Scaled(nn.Module):
    """Logits times ``factor``: input gradients ``factor`` times smaller (down to ~1e-10)."""

    def __init__(self, net: nn.Module, factor: float) -> None:
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x):
        return self.net(x) * self.factor


@pytest.mark.parametrize("factor", [1.0, 1e-7])
@pytest.mark.parametrize(("dtype", "tol"), [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_reduced_precision_grads(tmp_path, data, dtype, tol, factor):
    x, y = data
    teacher = Scaled(tiny_teacher(), factor)
    args = dict(views=2, augment="crop_flip", crop_padding=2, seed=7)
    exact_set = compute_signals(teacher, x, y, **args)
    half = compute_signals(teacher, x, y, **args, grad_dtype=dtype)
    assert half.grads.dtype == getattr(torch, dtype) and half.grad_scale.shape == (2, N)
    save_signals(half, tmp_path / "h.pt")
    back = load_signals(tmp_path / "h.pt")
    views, idx = torch.arange(N) % 2, torch.arange(N)
    exact = exact_set.signals(views, idx).input_grad.flatten(1)
    approx = back.signals(views, idx).input_grad.flatten(1)
    assert exact.abs().max() < 0.1 * factor  # small gradients: unscaled float16 would flush
    rel = (approx - exact).norm(dim=1) / exact.norm(dim=1)
    assert rel.max() < tol
    assert torch.equal(back.logits, exact_set.logits)  # logits stay float32


def test_corrupt_and_missing_files(tmp_path, sigset):
    path = tmp_path / "s.pt"
    with pytest.raises(SignalError, match="no teacher-signal file"):
        load_signals(path)
    save_signals(sigset, path)
    raw = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SignalError, match="does not load"):
        load_signals(tmp_path / "trunc.pt")
    # Flip bytes inside the gradient payload (found by its exact bytes): zip still loads.
    needle = sigset.grads[2, 5].contiguous().numpy().tobytes()[:64]
    pos = raw.find(needle)
    assert pos > 0
    bad = bytearray(raw)
    bad[pos : pos + 8] = bytes(8)
    (tmp_path / "flip.pt").write_bytes(bytes(bad))
    with pytest.raises(SignalError, match="corrupt"):
        load_signals(tmp_path / "flip.pt")
    load_signals(tmp_path / "flip.pt", verify=False)  # loads when asked not to check
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SignalError, match="not a kdiga signal file"):
        load_signals(tmp_path / "other.pt")


def test_mismatch_errors(tmp_path, data, sigset):
    path = tmp_path / "s.pt"
    save_signals(sigset, path)
    with pytest.raises(SignalMismatchError, match="teacher sha256"):
        load_signals(path, teacher_sha256=module_sha256(tiny_teacher().double()))
    with pytest.raises(SignalMismatchError, match="N=40 images, expected N=39"):
        load_signals(path, n=N - 1)
    x, y = data
    with pytest.raises(SignalMismatchError, match="N=40"):
        SignalCache(sigset, x[:-1], y[:-1])
    with pytest.raises(SignalMismatchError, match="data sha256"):
        SignalCache(sigset, x, (y + 1) % CLASSES)


def test_bad_arguments(data, teacher):
    x, y = data
    good = dict(views=2, augment="crop", crop_padding=2)
    for bad, match in [
        (dict(views=0), "views"),
        (dict(views=2, augment="none"), "needs an augmentation"),
        (dict(crop_padding=0), "crop_padding >= 1"),
        (dict(augment="rotate"), "augment"),
        (dict(crop_padding=-1), "crop_padding"),
        (dict(grad_dtype="int8"), "grad_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            compute_signals(teacher, x, y, **{**good, **bad})
    with pytest.raises(ValueError, match="uint8"):
        compute_signals(teacher, to_float(x), y, **good)
    with pytest.raises(ValueError, match="labels"):
        compute_signals(teacher, x, y[:-1], **good)


def _student() -> nn.Module:
    torch.manual_seed(4)
    return build_model("small_cnn", CLASSES, in_chans=3, image_size=SIZE, width=4)


def test_kdiga_epochs_from_cache_equal_live(data, teacher, sigset):
    x, y = data
    cache = SignalCache(sigset, x, y, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0)
    loss = build_loss("kdiga", iga_weight=1.0)

    def live_source(idx, epoch):  # the same views, teacher signals computed by the loss
        return cache.batch(idx, epoch)[0], None

    cached_student, live_student = _student(), _student()
    h_cached = fit(cached_student, loss, x, y, cfg, teacher=None, batch_source=cache)
    h_live = fit(live_student, loss, x, y, cfg, teacher=teacher, batch_source=live_source)
    assert h_cached[-1]["iga"] > 0
    moved = False
    for (name, a), b in zip(
        cached_student.state_dict().items(), live_student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        moved |= not torch.equal(a, _student().state_dict()[name])
    assert moved
    for a, b in zip(h_cached, h_live, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # Fresh random augmentation instead of the cached views trains to other weights.
    other = _student()
    aug_cfg = TrainConfig(
        epochs=2, batch_size=16, lr=0.05, seed=0, augment="crop_flip", crop_padding=2
    )
    fit(other, loss, x, y, aug_cfg, teacher=teacher)
    assert not torch.allclose(other.net.fc.weight, cached_student.net.fc.weight, atol=1e-4)


def test_fit_refuses_cache_where_unusable(data, teacher, sigset):
    x, y = data
    cache = SignalCache(sigset, x, y)
    cfg = TrainConfig(epochs=1, batch_size=16)
    arda = build_loss("kdiga_arda", eps=0.05, steps=1)
    with pytest.raises(ValueError, match=r"kdiga_arda.*accepts_teacher_cache is False"):
        fit(_student(), arda, x, y, cfg, teacher=teacher, batch_source=cache)
    with pytest.raises(ValueError, match="accepts_teacher_cache is False"):
        fit(_student(), arda, x, y, cfg, teacher=teacher, teacher_cache=lambda i: None)
    with pytest.raises(ValueError, match=r"batch_source.*augment='none'"):
        fit(
            _student(),
            build_loss("kdiga"),
            x,
            y,
            TrainConfig(epochs=1, augment="crop"),
            batch_source=cache,
        )
    student = copy.deepcopy(_student())
    fit(student, arda, x, y, cfg, teacher=teacher)  # without the cache arda trains as usual


def test_distill_stage_refuses_a_signal_file_made_otherwise(tmp_path, monkeypatch, data, sigset):
    """The distill stage's check: a file for another teacher, or with other views, augment,
    padding, dtype or seed than params.yaml asks for, stops with a message to re-run it."""
    from pipeline import dag
    from pipeline.params import parse_student_id, read_yaml, validate
    from pipeline.stages.distill import _signal_cache

    x, y = data
    monkeypatch.chdir(tmp_path)
    save_signals(sigset, dag.signals_path("pgdat"))
    raw = read_yaml(ROOT / "params.yaml")
    raw["shard"]["seed"] = 7
    raw["signals"] |= {"enabled": True, "views": 4, "grad_dtype": "float32"}
    raw["distill"] |= {"augment": "crop_flip", "crop_padding": 2}
    params = validate(raw)
    job = parse_student_id(params, "pgdat--kdiga--small_cnn--s0")
    sha = sigset.meta["teacher_sha256"]
    cache = _signal_cache(params, job, x, y, sha, "cpu")  # made as asked: accepted
    assert isinstance(cache, SignalCache) and cache.signal_set.views == 4
    with pytest.raises(SignalMismatchError, match="recompute the signals for this teacher"):
        _signal_cache(params, job, x, y, "0" * 64, "cpu")
    for section, key, value in [
        ("signals", "views", 8),
        ("signals", "grad_dtype", "float16"),
        ("distill", "augment", "crop"),
        ("distill", "crop_padding", 4),
    ]:
        other = copy.deepcopy(raw)
        other[section][key] = value
        with pytest.raises(ValueError, match=f"other settings .*'{key}'.*re-run its signals"):
            _signal_cache(validate(other), job, x, y, sha, "cpu")
