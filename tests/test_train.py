"""kdiga.train: the loop learns, is reproducible, resumes exactly, and fails loudly."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdiga.data import load_dataset
from kdiga.files import sha256_file
from kdiga.models import CheckpointError
from kdiga.train import NonFiniteLossError, TrainConfig, evaluate, fit, predict

REPO = Path(__file__).resolve().parents[1]


class CE(nn.Module):
    """Minimal criterion of the losses contract: plain cross-entropy."""

    requires_teacher = False

    def forward(self, student, teacher, x, y, teacher_out=None):
        loss = F.cross_entropy(student(x), y)
        return {"loss": loss, "ce": loss.detach()}


class NoisyCE(CE):
    """CE at a random point near x, drawn from the global RNG (like a PGD random start)."""

    def forward(self, student, teacher, x, y, teacher_out=None):
        return super().forward(student, teacher, (x + 0.05 * torch.randn_like(x)).clamp(0, 1), y)


def mlp(in_features: int = 64, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 32),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train", image_size=8), load_dataset(
        "digits", "test", image_size=8
    )


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic", "train", n=96, image_size=4, channels=1, seed=3)


def _no_time(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_learns_digits(digits):
    (x, y), (xt, yt) = digits
    model = mlp()
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.1, milestones=(3,), weight_decay=1e-4)
    history = fit(model, CE(), x, y, cfg, val=(xt, yt))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.1, 0.1, 0.01])
    assert history[-1]["ce"] < history[0]["ce"]
    assert evaluate(model, xt, yt) > 0.8
    assert history[-1]["val_acc"] == pytest.approx(evaluate(model, xt, yt))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", -1),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("milestones", (3, 2)),
        ("milestones", (0,)),
        ("lr_gamma", 0.0),
        ("augment", "flip"),
    ],
)
def test_config_validation_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{key}=.*allowed"):
        TrainConfig(**{"epochs": 1, key: value})


def test_same_seed_same_history_other_seed_differs(tiny):
    x, y = tiny
    init = mlp(16, dropout=0.2)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment="crop")
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(init)
        runs.append(
            (_no_time(fit(model, NoisyCE(), x, y, dataclasses.replace(cfg, seed=seed))), model)
        )
    assert runs[0][0] == runs[1][0] and _state_equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]


def test_fit_leaves_the_callers_rng_alone(tiny):
    model = mlp(16)
    before = torch.get_rng_state()
    fit(model, NoisyCE(), *tiny, TrainConfig(epochs=1, batch_size=32))
    assert torch.equal(torch.get_rng_state(), before)


def test_resume_gives_the_same_weights_as_one_run(tiny, tmp_path):
    x, y = tiny
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, milestones=(2,), augment="crop")
    torch.manual_seed(0)
    init = mlp(16, dropout=0.2)
    whole = copy.deepcopy(init)
    h_whole = fit(whole, NoisyCE(), x, y, cfg, checkpoint_path=tmp_path / "a.pt")

    first = copy.deepcopy(init)
    fit(
        first,
        NoisyCE(),
        x,
        y,
        dataclasses.replace(cfg, epochs=1),
        checkpoint_path=tmp_path / "b.pt",
    )
    resumed = mlp(16, dropout=0.2)  # another init: the checkpoint must overwrite it
    torch.manual_seed(123)  # another caller RNG state: the checkpoint's must be used
    h_resumed = fit(resumed, NoisyCE(), x, y, cfg, checkpoint_path=tmp_path / "b.pt")
    assert _state_equal(whole, resumed)
    assert _no_time(h_whole) == _no_time(h_resumed)
    # a finished run resumes to a no-op that returns its history
    again = mlp(16, dropout=0.2)
    assert _no_time(fit(again, NoisyCE(), x, y, cfg, checkpoint_path=tmp_path / "b.pt")) == (
        _no_time(h_whole)
    )
    assert _state_equal(again, whole)


class ListStream:
    """A BatchStream over in-memory tensors: a permutation per epoch, nothing else."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.steps_per_epoch = len(y) // batch_size

    def batches(self, epoch, start_batch=0):
        perm = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(epoch))
        for k in range(start_batch, self.steps_per_epoch):
            idx = perm[k * self.batch_size : (k + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


class Stop(Exception):
    pass


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_checkpoint_every_resumes_mid_epoch_with_the_same_weights(tiny, tmp_path, source):
    """Interrupted at step 4 of epoch 2 with a checkpoint every 2 steps: the re-run starts at
    step 2 of epoch 2 (augmentation, RNG and the epoch's loss sums restored) and ends where an
    uninterrupted run ends, history included."""
    x, y = tiny
    augment = "crop" if source == "memory" else "none"
    cfg = TrainConfig(
        epochs=3, batch_size=16, lr=0.05, milestones=(2,), augment=augment, checkpoint_every=2
    )
    data = (
        {"images": x, "labels": y}
        if source == "memory"
        else {"images": None, "labels": None, "stream": ListStream(x, y, 16)}
    )

    def run(model, path, on_batch=None):
        return fit(model, NoisyCE(), cfg=cfg, checkpoint_path=path, on_batch=on_batch, **data)

    torch.manual_seed(0)
    init = mlp(16, dropout=0.2)
    whole = copy.deepcopy(init)
    h_whole = run(whole, tmp_path / "a.pt")

    def stop(info):
        if (info["epoch"], info["batch"]) == (2, 3):
            raise Stop

    with pytest.raises(Stop):
        run(copy.deepcopy(init), tmp_path / "b.pt", stop)
    ckpt = torch.load(tmp_path / "b.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["position"]["batch"]) == (1, 2)
    resumed = mlp(16, dropout=0.2)
    torch.manual_seed(123)
    h_resumed = run(resumed, tmp_path / "b.pt")
    assert _state_equal(whole, resumed)
    assert _no_time(h_whole) == _no_time(h_resumed)
    assert "position" not in torch.load(tmp_path / "b.pt", weights_only=True)


def test_stream_refuses_in_memory_settings(tiny):
    x, y = tiny
    stream = ListStream(x, y, 16)
    cfg = TrainConfig(epochs=1, batch_size=16)
    with pytest.raises(ValueError, match="either images and labels or stream"):
        fit(mlp(16), CE(), x, y, cfg, stream=stream)
    with pytest.raises(ValueError, match="augment='none'"):
        fit(mlp(16), CE(), None, None, dataclasses.replace(cfg, augment="crop"), stream=stream)
    stream.steps_per_epoch = 0
    with pytest.raises(ValueError, match="steps_per_epoch must be an int >= 1"):
        fit(mlp(16), CE(), None, None, cfg, stream=stream)


def test_resume_refuses_another_config_or_a_later_checkpoint(tiny, tmp_path):
    x, y = tiny
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    fit(mlp(16), CE(), x, y, cfg, checkpoint_path=tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.05 vs now 0\.1"):
        fit(
            mlp(16), CE(), x, y, dataclasses.replace(cfg, lr=0.1), checkpoint_path=tmp_path / "c.pt"
        )
    with pytest.raises(ValueError, match="epoch 2, past the requested epochs=1"):
        fit(
            mlp(16),
            CE(),
            x,
            y,
            dataclasses.replace(cfg, epochs=1),
            checkpoint_path=tmp_path / "c.pt",
        )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        fit(mlp(16), CE(), x, y, cfg, checkpoint_path=tmp_path / "junk.pt")


def test_resume_checkpoint_of_another_architecture_names_it_and_says_delete_it(tiny, tmp_path):
    x, y = tiny
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    ckpt = tmp_path / "d.pt"
    fit(mlp(16), CE(), x, y, dataclasses.replace(cfg, epochs=1), checkpoint_path=ckpt)
    wider = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(CheckpointError) as info:
        fit(wider, CE(), x, y, cfg, checkpoint_path=ckpt)
    message = str(info.value)
    assert message == (
        f"{ckpt}: resume checkpoint does not fit this model, it was left by another "
        "architecture or run (missing keys 3.weight, 3.bias; unexpected keys 4.weight, 4.bias; "
        "size mismatch for 1.weight: [32, 16] in the checkpoint, [64, 16] in the model); "
        "delete it to start this run over"
    )
    assert "Error(s) in loading state_dict" not in message
    assert _state_equal_dicts(wider.state_dict(), before)  # refused before loading anything
    ckpt.unlink()  # as the message says: the run then starts over
    assert len(fit(wider, CE(), x, y, cfg, checkpoint_path=ckpt)) == 2


def test_resume_checkpoint_whose_optimizer_does_not_fit_says_so(tiny, tmp_path):
    x, y = tiny
    ckpt = tmp_path / "o.pt"
    cfg = TrainConfig(epochs=2, batch_size=32)
    fit(mlp(16), CE(), x, y, dataclasses.replace(cfg, epochs=1), checkpoint_path=ckpt)
    state = torch.load(ckpt, weights_only=True)
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0]))
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"does not fit this optimizer, .*delete it") as info:
        fit(mlp(16), CE(), x, y, cfg, checkpoint_path=ckpt)
    assert str(info.value).startswith(f"{ckpt}: resume checkpoint does not fit this optimizer")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_resume_checkpoint_names_it_and_says_delete_it(tiny, tmp_path, damage):
    x, y = tiny
    ckpt = tmp_path / "t.pt"
    cfg = TrainConfig(epochs=2, batch_size=32)
    fit(mlp(16), CE(), x, y, dataclasses.replace(cfg, epochs=1), checkpoint_path=ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 50)
    with pytest.raises(CheckpointError) as info:
        fit(mlp(16), CE(), x, y, cfg, checkpoint_path=ckpt)
    message = str(info.value)
    assert message.startswith(
        f"{ckpt}: resume checkpoint is corrupt or truncated and does not load ("
    )
    assert message.endswith("); delete it to start this run over")
    assert "\n" not in message and len(message) < 400


def _state_equal_dicts(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class NaNAt(CE):
    def __init__(self, epoch: int, batch: int, per_epoch: int) -> None:
        super().__init__()
        self.when, self.calls = (epoch - 1) * per_epoch + batch, 0

    def forward(self, student, teacher, x, y, teacher_out=None):
        parts = super().forward(student, teacher, x, y)
        self.calls += 1
        if self.calls - 1 == self.when:
            parts["loss"] = parts["loss"] * float("nan")
        return parts


def test_nan_loss_names_epoch_and_batch_and_keeps_the_checkpoint(tiny, tmp_path):
    x, y = tiny  # 96 samples, batch 16: 6 batches an epoch
    ckpt = tmp_path / "n.pt"
    digests = []
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 3") as err:
        fit(
            mlp(16),
            NaNAt(epoch=2, batch=3, per_epoch=6),
            x,
            y,
            TrainConfig(epochs=3, batch_size=16),
            checkpoint_path=ckpt,
            on_epoch=lambda rec: digests.append(sha256_file(ckpt)),
        )
    assert (err.value.epoch, err.value.batch) == (2, 3)
    assert len(digests) == 1 and sha256_file(ckpt) == digests[0]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1


class Inspect(CE):
    """Checks what the loop hands the criterion."""

    def __init__(self, labels: torch.Tensor) -> None:
        super().__init__()
        self.labels, self.seen = labels, []

    def forward(self, student, teacher, x, y, teacher_out=None):
        assert student.training and not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
        if teacher_out is not None:  # the cache returns the batch's indices here
            assert torch.equal(self.labels[teacher_out], y)
            self.seen += teacher_out.tolist()
        return super().forward(student, teacher, x, y)


def test_teacher_frozen_cache_indices_and_callbacks(tiny):
    x, y = tiny
    teacher = mlp(16, dropout=0.5)
    crit = Inspect(y)
    batches = []
    cfg = TrainConfig(epochs=2, batch_size=20, drop_last=True)
    history = fit(
        mlp(16),
        crit,
        x,
        y,
        cfg,
        teacher=teacher,
        teacher_cache=lambda idx: idx,
        on_batch=batches.append,
    )
    assert len(history) == 2 and not teacher.training
    assert len(batches) == 8 and {b["num_batches"] for b in batches} == {4}  # 96 // 20
    assert len(crit.seen) == 160 and len(set(crit.seen[:80])) == 80  # no repeats in an epoch
    with pytest.raises(ValueError, match="teacher_cache"):
        fit(mlp(16), crit, x, y, dataclasses.replace(cfg, augment="crop"), teacher_cache=len)


def test_bad_inputs(tiny):
    x, y = tiny
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fit(mlp(16), CE(), x[:, 0], y, cfg)
    with pytest.raises(ValueError, match="labels"):
        fit(mlp(16), CE(), x, y[:-1], cfg)
    with pytest.raises(ValueError, match="'loss'"):
        fit(mlp(16), lambda s, t, xb, yb: {"ce": s(xb).sum()}, x, y, cfg)
    with pytest.raises(ValueError, match="no gradient"):
        fit(mlp(16), lambda s, t, xb, yb: {"loss": s(xb).sum().detach()}, x, y, cfg)
    with pytest.raises(ValueError, match="leaves no batch"):
        fit(mlp(16), CE(), x, y, TrainConfig(epochs=1, batch_size=200, drop_last=True))


def test_evaluate_and_predict_restore_mode(tiny):
    x, y = tiny
    model = mlp(16, dropout=0.5).train()
    logits = predict(model, x, batch_size=7)
    assert logits.shape == (96, 10) and model.training
    assert torch.equal(logits, predict(model, x, batch_size=96))  # eval mode: no dropout
    acc = evaluate(model, x, y, batch_size=50)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert model.training


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    import torch.nn.functional as F
    from kdiga.data import load_dataset
    from kdiga.train import TrainConfig, fit

    class NoisyCE(nn.Module):
        def forward(self, student, teacher, x, y):
            x = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
            loss = F.cross_entropy(student(x), y)
            return {"loss": loss, "ce": loss.detach()}

    def on_batch(info):
        if os.environ.get("KILL_AT") and (info["epoch"], info["batch"]) == (2, 3):
            os.kill(os.getpid(), signal.SIGKILL)

    x, y = load_dataset("synthetic", "train", n=128, image_size=6, channels=1, seed=5)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, milestones=(2,), augment="crop")
    for ckpt, out in zip(sys.argv[1::2], sys.argv[2::2]):  # one run per (checkpoint, output)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Dropout(0.2),
                              nn.Linear(32, 10))
        fit(model, NoisyCE(), x, y, cfg, checkpoint_path=ckpt, on_batch=on_batch)
        torch.save(model.state_dict(), out)
    """
)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*names: str, kill: bool) -> subprocess.CompletedProcess:
        extra = {"KILL_AT": "1"} if kill else {}
        return subprocess.run(
            [sys.executable, str(script), *(str(tmp_path / n) for n in names)],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    killed = run("k.pt", "k_final.pt", kill=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "k_final.pt").exists()
    assert torch.load(tmp_path / "k.pt", weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
    # the re-run of the killed one, then an uninterrupted run in a fresh checkpoint
    rerun = run("k.pt", "k_final.pt", "w.pt", "w_final.pt", kill=False)
    assert rerun.returncode == 0, rerun.stderr
    a = torch.load(tmp_path / "k_final.pt", weights_only=True)
    b = torch.load(tmp_path / "w_final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_cuda_bf16_channels_last_resume(tmp_path):
    x, y = load_dataset("synthetic", "train", n=64, image_size=8, channels=3, seed=1)
    conv = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment="crop_flip")
    fit(
        conv,
        NoisyCE(),
        x,
        y,
        dataclasses.replace(cfg, epochs=1),
        device="cuda",
        checkpoint_path=tmp_path / "g.pt",
    )
    history = fit(conv, NoisyCE(), x, y, cfg, device="cuda", checkpoint_path=tmp_path / "g.pt")
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert next(conv.parameters()).is_cuda
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.load(tmp_path / "g.pt", weights_only=True)["rng"]["cuda"] is not None
    assert 0.0 <= evaluate(conv, x, y, device="cuda") <= 1.0
