"""kdiga.distributed: fit under DDP (2 CPU processes, gloo) trains exactly as one process.

The DDP side runs once per module: this file, started as a script twice with torchrun's
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), runs every
case of ``CASES`` under DDP and saves its results; the tests run the same cases in this
process (one process, the same global batches) and compare.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdiga import distributed as kd_dist
from kdiga.data import load_dataset
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
WORLD = 2

# name -> (method, loss settings, N, TrainConfig settings)
CASES: dict[str, tuple[str, dict, int, dict]] = {
    # (a), (b): one step on a global batch of 8 (4 per rank)
    "st_step": ("st", {}, 8, {"epochs": 1, "batch_size": 8}),
    "kd_step": ("kd", {"temperature": 2.0}, 8, {"epochs": 1, "batch_size": 8}),
    "kdiga_step": ("kdiga", {"iga_weight": 5.0}, 8, {"epochs": 1, "batch_size": 8}),
    "kdiga_eval_step": (
        "kdiga",
        {"iga_weight": 5.0, "student_grad_mode": "eval"},
        8,
        {"epochs": 1, "batch_size": 8},
    ),
    # PGD inside the step (random starts are per rank: runs, but not the one-process draw)
    "ard_step": ("ard", {"steps": 2}, 8, {"epochs": 1, "batch_size": 8}),
    # (c): two epochs, 6 steps each, a milestone
    "kdiga_fit": (
        "kdiga",
        {"iga_weight": 5.0},
        48,
        {"epochs": 2, "batch_size": 8, "milestones": (1,)},
    ),
    # augmentation drawn on the global batch; a last batch of 5 split 3 + 2
    "kdiga_crop_uneven": (
        "kdiga",
        {"iga_weight": 5.0},
        45,
        {"epochs": 2, "batch_size": 8, "augment": "crop", "crop_padding": 1},
    ),
}
BASE_CFG = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seed": 7}


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_dataset("synthetic", "train", n=n, image_size=8, channels=1, seed=3)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", 10, in_chans=1, image_size=8, width=4)


def _bn_net() -> nn.Module:
    torch.manual_seed(31)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def _bn_fit() -> dict:
    """KD of a BatchNorm student, one epoch: per-rank batch statistics under DDP."""
    x, y = _data(32)
    model = _bn_net()
    fit(
        model,
        build_loss("kd"),
        x,
        y,
        TrainConfig(epochs=1, batch_size=8, lr=0.05),
        teacher=_net(12),
    )
    return model.state_dict()


def _run_case(name: str, checkpoint: Path | None = None, n: int | None = None) -> dict:
    """Train case ``name`` in this process (under DDP when a process group is up)."""
    method, loss_cfg, n_case, cfg_kw = CASES[name]
    x, y = _data(n_case)
    if n is not None:  # a sub-batch, for the can-fail checks
        x, y = x[:n], y[:n]
    student = _net(11)
    init = copy.deepcopy(student.state_dict())
    cfg = TrainConfig(**BASE_CFG, **cfg_kw)
    history = fit(
        student,
        build_loss(method, **loss_cfg),
        x,
        y,
        cfg,
        teacher=_net(12),
        checkpoint_path=checkpoint,
    )
    return {"init": init, "final": student.state_dict(), "history": history}


class NoisyKD(nn.Module):
    """KD at a random point near x, drawn from the global RNG (like a PGD random start)."""

    def __init__(self) -> None:
        super().__init__()
        self.kd = build_loss("kd")

    def forward(self, student, teacher, x, y, teacher_out=None):
        return self.kd(student, teacher, (x + 0.05 * torch.randn_like(x)).clamp(0, 1), y)


def _refusals(x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
    """The ValueError message of each run DDP must refuse (every rank raises alike)."""
    cfg = TrainConfig(epochs=1, batch_size=8)
    runs = {
        "batch_frobenius": (build_loss("kdiga", iga_reduction="batch_frobenius"), cfg, x),
        "indivisible": (build_loss("st"), dataclasses.replace(cfg, batch_size=7), x),
        "tiny_last_batch": (build_loss("st"), cfg, x[:17]),
        "sync_bn_cpu": (build_loss("st"), dataclasses.replace(cfg, sync_bn=True), x),
    }
    out = {}
    for key, (crit, c, xs) in runs.items():
        try:
            fit(_net(1), crit, xs, y[: xs.shape[0]], c, teacher=_net(2))
            out[key] = "no error"
        except ValueError as err:
            out[key] = str(err)
    return out


def _worker(out: Path) -> None:
    """One rank: every DDP case; results to ``out/rank{r}.pt``."""
    torch.set_num_threads(1)
    info = kd_dist.init_from_env(timeout=timedelta(seconds=90))
    import kdiga.train.checkpoint as checkpoint_mod  # where the checkpoint is written

    save = checkpoint_mod.atomic_torch_save

    def recording_save(obj, path):  # which ranks write checkpoints
        with open(out / f"writes{info.rank}.txt", "a") as fh:
            fh.write(f"{Path(path).name}\n")
        save(obj, path)

    checkpoint_mod.atomic_torch_save = recording_save
    res: dict = {"info": info, "is_main": kd_dist.is_main()}
    for name in CASES:
        res[name] = _run_case(name, checkpoint=out / f"{name}.pt" if name == "kdiga_fit" else None)
    x, y = _data(48)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, **{"seed": 5})
    whole, part = _net(21), _net(21)
    fit(whole, NoisyKD(), x, y, cfg, teacher=_net(12), checkpoint_path=out / "whole.pt")
    fit(
        part,
        NoisyKD(),
        x,
        y,
        dataclasses.replace(cfg, epochs=1),
        teacher=_net(12),
        checkpoint_path=out / "part.pt",
    )
    resumed = _net(99)  # another init: the checkpoint must overwrite it
    torch.manual_seed(1234)  # another RNG state: the checkpoint's must be used
    fit(resumed, NoisyKD(), x, y, cfg, teacher=_net(12), checkpoint_path=out / "part.pt")
    res["resume"] = {"whole": whole.state_dict(), "resumed": resumed.state_dict()}
    res["refusals"] = _refusals(x, y)
    res["bn"] = _bn_fit()
    rank = torch.tensor([float(info.rank)])
    res["mean"] = kd_dist.all_reduce_mean(rank).item()
    res["weighted"] = kd_dist.all_reduce_weighted_mean(rank + 1, 1 + 2 * info.rank)[0].item()
    try:
        kd_dist.check_same_on_all_ranks(info.rank, "the rank")
        res["disagree"] = "no error"
    except ValueError as err:
        res["disagree"] = str(err)
    kd_dist.barrier()
    torch.save(res, out / f"rank{info.rank}.pt")
    kd_dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[dict, dict, Path]:
    """Results of rank 0 and rank 1 of the DDP worker, and its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    base = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out)],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    return r0, r1, out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _update(run: dict) -> dict:
    return {k: run["final"][k] - run["init"][k] for k in run["final"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["st_step", "kd_step", "kdiga_step", "kdiga_eval_step"])
def test_one_step_under_ddp_is_the_single_process_step(ddp, name):
    r0, r1, _ = ddp
    one = _run_case(name)  # one process, the same 8 samples
    assert _max_diff(r0[name]["init"], one["init"]) == 0
    big = max(v.abs().max().item() for v in _update(one).values())
    assert big > 1e-3  # a real update
    assert _max_diff(_update(r0[name]), _update(one)) < 1e-6
    assert _max_diff(r0[name]["final"], r1[name]["final"]) == 0  # ranks in lockstep
    # can fail: rank 0's half of the batch alone gives another update
    half = _run_case(name, n=4)
    assert _max_diff(_update(half), _update(one)) > 1e2 * _max_diff(_update(r0[name]), _update(one))
    for key, value in one["history"][0].items():
        if key != "time_s":  # global-batch means on both ranks
            assert r0[name]["history"][0][key] == pytest.approx(value, rel=1e-5, abs=1e-7)
            assert r1[name]["history"][0][key] == r0[name]["history"][0][key]


@pytest.mark.slow
def test_adversarial_step_runs_under_ddp_in_lockstep(ddp):
    r0, r1, _ = ddp
    assert _max_diff(r0["ard_step"]["final"], r1["ard_step"]["final"]) == 0
    assert _max_diff(r0["ard_step"]["final"], r0["ard_step"]["init"]) > 1e-4
    assert all(torch.isfinite(v).all() for v in r0["ard_step"]["final"].values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kdiga_fit", "kdiga_crop_uneven"])
def test_fit_under_ddp_ends_with_the_single_process_weights(ddp, name, tmp_path):
    r0, r1, out = ddp
    one = _run_case(name, checkpoint=tmp_path / "one.pt")
    assert _max_diff(r0[name]["final"], one["final"]) < 1e-6
    assert _max_diff(r0[name]["final"], r1[name]["final"]) == 0
    assert [h["epoch"] for h in r0[name]["history"]] == [1, 2]
    for got, want in zip(r0[name]["history"], one["history"], strict=True):
        assert got["lr"] == want["lr"]
        for k in ("loss", "ce", "kl", "iga"):
            assert got[k] == pytest.approx(want[k], rel=1e-4)
    if name == "kdiga_fit":  # only rank 0 wrote the checkpoint, once per epoch
        assert (out / "writes0.txt").read_text().splitlines().count("kdiga_fit.pt") == 2
        assert not (out / "writes1.txt").exists()
        ckpt = torch.load(out / "kdiga_fit.pt", weights_only=True)
        assert ckpt["epoch"] == 2 and len(ckpt["rng"]["ranks"]) == WORLD
        assert _max_diff(ckpt["model"], r0[name]["final"]) == 0


@pytest.mark.slow
def test_resume_under_ddp_matches_an_uninterrupted_ddp_run(ddp):
    r0, r1, out = ddp
    for r in (r0, r1):
        assert _max_diff(r["resume"]["whole"], r["resume"]["resumed"]) == 0
    streams = torch.load(out / "whole.pt", weights_only=True)["rng"]["ranks"]
    assert not torch.equal(streams[0]["torch"], streams[1]["torch"])  # per-rank noise


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_on_one_process(ddp, tmp_path, caplog):
    _, _, out = ddp
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes((out / "whole.pt").read_bytes())  # DDP run, 2 epochs done
    before = torch.load(ckpt, weights_only=True)
    x, y = _data(48)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=5)
    model = _net(99)
    history = fit(model, NoisyKD(), x, y, cfg, teacher=_net(12), checkpoint_path=ckpt)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[:2] == before["history"]
    assert "written by 2 process(es), resumed by 1" in caplog.text
    assert _max_diff(model.state_dict(), before["model"]) > 1e-5  # it trained on


@pytest.mark.slow
def test_batchnorm_uses_per_rank_statistics_and_ranks_agree_after_fit(ddp):
    r0, r1, _ = ddp
    assert _max_diff(r0["bn"], r1["bn"]) == 0  # buffers broadcast from rank 0 after the epoch
    one = _bn_fit()  # one process: statistics of the global batch
    assert _max_diff(r0["bn"], one) > 1e-4
    assert not torch.allclose(r0["bn"]["1.running_var"], one["1.running_var"], atol=1e-5)


@pytest.mark.slow
def test_ddp_refuses_what_it_cannot_compute_exactly(ddp):
    r0, r1, _ = ddp
    assert r0["refusals"] == r1["refusals"]  # every rank raises alike: no hang
    msgs = r0["refusals"]
    assert (
        "batch_frobenius" in msgs["batch_frobenius"]
        and "per_sample_mean" in msgs["batch_frobenius"]
    )
    assert "not divisible by world size 2" in msgs["indivisible"]
    assert "final batch has 1 sample" in msgs["tiny_last_batch"]
    assert "sync_bn=True needs CUDA" in msgs["sync_bn_cpu"]


@pytest.mark.slow
def test_env_info_and_reductions(ddp):
    r0, r1, _ = ddp
    assert r0["info"] == kd_dist.DistInfo(0, 2, 0, True) and r0["is_main"]
    assert r1["info"] == kd_dist.DistInfo(1, 2, 1, True) and not r1["is_main"]
    assert r0["mean"] == r1["mean"] == 0.5
    assert r0["weighted"] == r1["weighted"] == pytest.approx((1 * 1 + 2 * 3) / 4)
    assert r0["disagree"] == r1["disagree"]
    assert "ranks disagree on the rank: [0, 1]" in r0["disagree"]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    per_rank=st.integers(1, 6),
    world=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_rank_slices_tile_the_single_process_batches(n, per_rank, world, drop_last, seed):
    batch = per_rank * world
    single = kd_dist.shard_indices(
        n, 0, 1, torch.Generator().manual_seed(seed), batch_size=batch, drop_last=drop_last
    )
    shards = [
        kd_dist.shard_indices(
            n, r, world, torch.Generator().manual_seed(seed), batch_size=batch, drop_last=drop_last
        )
        for r in range(world)
    ]
    assert all(len(s) == len(single) for s in shards)
    for k, whole in enumerate(single):
        assert torch.equal(torch.cat([s[k] for s in shards]), whole)  # disjoint, in order
        sizes = [s[k].numel() for s in shards]
        assert max(sizes) - min(sizes) <= 1
        if whole.numel() == batch:
            assert sizes == [per_rank] * world
    seen = torch.cat(single) if single else torch.empty(0, dtype=torch.long)
    assert seen.unique().numel() == seen.numel()
    assert seen.numel() == (n - n % batch if drop_last else n)


def test_shard_and_slice_reject_bad_arguments():
    gen = torch.Generator()
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        kd_dist.shard_indices(10, 0, 3, gen, batch_size=4)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        kd_dist.rank_slice(8, 2, 2)
    with pytest.raises(ValueError, match=">= 1"):
        kd_dist.shard_indices(0, 0, 1, gen, batch_size=4)


def test_init_from_env_without_torchrun_is_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert kd_dist.init_from_env() == kd_dist.DistInfo(0, 1, 0, False)
    assert kd_dist.current() == kd_dist.DistInfo() and kd_dist.is_main()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not kd_dist.init_from_env().is_distributed
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        kd_dist.init_from_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="needs MASTER_ADDR"):
        kd_dist.init_from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one'"):
        kd_dist.init_from_env()
    with pytest.raises(ValueError, match="backend='mpi'"):
        kd_dist.init_from_env("mpi")


def test_sync_batchnorm_swaps_in_place_and_restores():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Sequential(nn.BatchNorm2d(3)), nn.ReLU())
    bn = model[1][0]
    with kd_dist.sync_batchnorm(model) as same:
        assert same is model and isinstance(model[1][0], nn.SyncBatchNorm)
        assert model[1][0].weight is bn.weight and model[1][0].running_mean is bn.running_mean
        with torch.no_grad():
            model[1][0].weight.add_(1.0)
        model.eval()
    assert model[1][0] is bn and not bn.training
    assert torch.equal(bn.weight, torch.full((3,), 2.0))


def test_checks_pass_on_one_process():
    crit = build_loss("kdiga", iga_reduction="batch_frobenius")
    kd_dist.check_run(17, 7, False, 1, crit, sync_bn=True, device=torch.device("cpu"))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
