"""Progress: each long loop of kdiga reports done/total through its callback, with the right
totals; the pipeline shows it (tqdm bars on a terminal, throttled log lines elsewhere) and
keeps a throttled progress file whose state run() ends done or failed."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tiny_study import TINY
from torch import nn
from tqdm import tqdm

from kdiga.attacks import autoattack, robust_sweep
from kdiga.bounds import AscentSettings, table4
from kdiga.files import temporary_prefix
from kdiga.progress import Progress, Tracker
from kdiga.shards import write_shards
from kdiga.signals import compute_signals
from kdiga.stream import write_image_shards
from kdiga.train import TrainConfig, fit
from pipeline import progress as pp
from pipeline.stages.common import run


class Events(list):
    """A progress callback that keeps every event."""

    def __call__(self, event: Progress) -> None:
        self.append(event)

    def of(self, task: str) -> list[Progress]:
        return [e for e in self if e.task == task]


def assert_counts_up(events: list[Progress], total: int) -> None:
    """One task's events: the right total throughout, done from 0 (or a resume point) up to
    the total, never down."""
    assert events, "no event"
    assert {e.total for e in events} == {total}
    dones = [e.done for e in events]
    assert dones == sorted(dones) and dones[0] >= 0 and dones[-1] == total


class CE(nn.Module):
    def forward(self, student, teacher, x, y, teacher_out=None):
        loss = F.cross_entropy(student(x), y)
        return {"loss": loss}


def mlp(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))


def tiny_cnn(classes: int = 10) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, classes)
    ).eval()


def labelled(model: nn.Module, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 1, 8, 8] labelled by the model (every one correct clean)."""
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


# -- kdiga's loops ----------------------------------------------------------------------------


def test_training_steps_count_every_epoch_and_resume_where_they_stopped(tmp_path):
    x = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (50,))
    ckpt, events = tmp_path / "ckpt.pt", Events()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05)  # 4 steps an epoch (the last of 2)
    fit(mlp(), CE(), x, y, cfg, checkpoint_path=ckpt, progress=events)
    assert_counts_up(events, 8)
    assert [e.done for e in events] == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8]  # each epoch starts
    assert {e.unit for e in events} == {"steps"} and {e.task for e in events} == {"train"}
    assert events[6].detail == "epoch 2/2, step 1/4"
    more = Events()
    fit(
        mlp(),
        CE(),
        x,
        y,
        TrainConfig(epochs=3, batch_size=16, lr=0.05),
        checkpoint_path=ckpt,
        progress=more,
    )
    assert [e.done for e in more] == [8, 9, 10, 11, 12]  # resumed at epoch 2 of 3
    assert_counts_up(more, 12)


class Stream:
    """A BatchStream of ``steps_per_epoch`` random batches an epoch."""

    steps_per_epoch = 3

    def batches(self, epoch: int, start_batch: int = 0):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(start_batch, self.steps_per_epoch):
            yield torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_streamed_training_steps_count_to_epochs_times_steps_per_epoch():
    events = Events()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05)
    fit(mlp(), CE(), None, None, cfg, stream=Stream(), progress=events)
    assert_counts_up(events, 6)
    assert [e.done for e in events] == [0, 1, 2, 3, 3, 4, 5, 6]
    assert events[-1].detail == "epoch 2/2, step 3/3"


def test_pgd_sweep_counts_batches_times_radii():
    model = tiny_cnn()
    x, y = labelled(model, 10)
    events = Events()
    robust_sweep(model, x, y, [0.1, 0.0, 0.05], steps=2, batch_size=4, progress=events)
    assert_counts_up(events, 3 * 3)  # 3 batches (4, 4, 2) x 3 radii
    assert [e.done for e in events] == list(range(10))
    assert events[-1].detail == "batch 3/3, radius 0.1"
    assert {e.task for e in events} == {"pgd sweep"} and events[0].unit == "attacks"


def test_a_resumed_sweep_starts_at_its_saved_batches(tmp_path):
    model = tiny_cnn()
    x, y = labelled(model, 10)
    state = tmp_path / "sweep.pt"
    kw = dict(steps=2, batch_size=4, state_path=state)
    first = Events()

    def killed_in_batch_two(event: Progress) -> None:
        first(event)
        if event.done == 4:  # its last radius done, its state not yet saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        robust_sweep(model, x, y, [0.05, 0.1], progress=killed_in_batch_two, **kw)
    again = Events()
    robust_sweep(model, x, y, [0.05, 0.1], progress=again, **kw)
    assert [e.done for e in first] == [0, 1, 2, 3, 4]
    assert [e.done for e in again] == [2, 3, 4, 5, 6]  # batch 1 was saved; batch 2 was not
    assert_counts_up(again, 6)


AA = {"version": "custom", "n_iter": 5, "seed": 0}


def test_autoattack_reports_each_stage_over_the_points_still_robust():
    model = tiny_cnn()
    x, y = labelled(model, 12)
    y[:2] = (y[:2] + 1) % 10  # two wrong clean: never attacked
    events = Events()
    res = autoattack(
        model, x, y, eps=0.05, batch_size=4, attacks=["apgd-ce", "apgd-t"], progress=events, **AA
    )
    first = autoattack(model, x, y, eps=0.05, batch_size=4, attacks=["apgd-ce"], **AA)
    ce, t = events.of("autoattack apgd-ce"), events.of("autoattack apgd-t")
    assert [e.task for e in events] == [e.task for e in ce + t]  # one stage after the other
    assert_counts_up(ce, 10)  # the clean-correct points
    assert_counts_up(t, int(first.robust.sum()))  # those APGD-CE left robust
    assert [e.done for e in ce] == [0, 4, 8, 10]  # one event per attack batch
    assert t[0].unit == "samples" and t[0].detail == "eps 0.05"
    assert int(res.robust.sum()) <= t[-1].total
    plain = autoattack(model, x, y, eps=0.05, batch_size=4, attacks=["apgd-ce", "apgd-t"], **AA)
    assert torch.equal(plain.robust, res.robust) and plain.forward_evals == res.forward_evals


def test_an_autoattack_sweep_reports_its_attacks_and_the_stages_inside():
    model = tiny_cnn()
    x, y = labelled(model, 6)
    events = Events()
    aa = {k: v for k, v in AA.items() if k != "seed"} | {"attacks": ["apgd-ce"]}
    res = robust_sweep(
        model,
        x,
        y,
        [0.05, 0.2],
        attack="autoattack",
        batch_size=3,
        autoattack_kwargs=aa,
        progress=events,
    )
    assert_counts_up(events.of("autoattack sweep"), 2 * 2)
    starts = [e.total for e in events.of("autoattack apgd-ce") if e.done == 0]
    # batch by batch, radius by radius: the stage over the points still robust (none: no run)
    left = [int(res.robust[0, :3].sum()), int(res.robust[0, 3:].sum())]
    assert starts == [3, *[n for n in left[:1] if n], 3, *[n for n in left[1:] if n]]


def test_bounds_count_batches_times_radii():
    torch.manual_seed(3)
    student = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.rand(7, 1, 8, 8), torch.randint(0, 3, (7,))
    events = Events()
    table4(
        student,
        teacher,
        x,
        y,
        settings=AscentSettings(steps=2, restarts=1),
        radii=(0.05, 0.1),
        batch_size=3,
        check_samples=4,
        random_points=1,
        pgd_steps=1,
        progress=events,
    )
    assert_counts_up(events, 3 * 2)  # 3 batches (3, 3, 1) x 2 radii, checked or not
    assert [e.done for e in events] == list(range(7))
    assert events[-1].detail == "batch 3/3, radius 0.1" and events[0].unit == "ascents"


def test_signals_count_images_of_every_view():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 5, (10,))
    events = Events()
    compute_signals(
        teacher, x, y, views=3, augment="crop_flip", crop_padding=1, batch_size=4, progress=events
    )
    assert_counts_up(events, 3 * 10)
    assert [e.done for e in events] == [0, 4, 8, 10, 14, 18, 20, 24, 28, 30]
    assert events[-1].detail == "view 3/3" and events[0].unit == "images"


def test_shard_writer_counts_images_through_its_shards(tmp_path):
    x = torch.randint(0, 256, (600, 1, 2, 2), dtype=torch.uint8)
    events = Events()
    write_shards(
        x,
        torch.zeros(600, dtype=torch.long),
        tmp_path,
        prefix="train",
        max_per_shard=250,
        progress=events,
    )
    assert_counts_up(events, 600)
    assert [e.done for e in events] == [0, 250, 256, 500, 512, 600]  # every 256, each shard
    assert {e.task for e in events} == {"shard train"}


def test_image_shard_writer_counts_the_images_it_writes(tmp_path):
    root = tmp_path / "train"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5):
            img = (np.arange(48).reshape(4, 4, 3) * (i + c + 1) % 256).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    events = Events()
    write_image_shards(
        root,
        tmp_path / "out",
        prefix="val",
        max_per_shard=4,
        indices=[0, 3, 5, 6, 9, 1, 2],
        progress=events,
    )
    assert_counts_up(events, 7)
    assert [e.done for e in events] == [0, 4, 7] and events[1].detail == "shard 1"


def test_tracker_without_a_callback_counts_silently():
    t = Tracker(None, "x", 3, "its")
    t.advance(2)
    t.at(3)
    assert t.done == 3


# -- the pipeline's displays ----------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_log_lines_come_once_an_interval_with_done_total_rate_and_eta(caplog):
    clock = Clock()
    job = pp.JobProgress("distill", None, display=pp.LogLines(60, clock), clock=clock)
    caplog.set_level(logging.INFO, logger="kdiga.pipeline.progress")
    for step in range(301):  # a step every second for 5 minutes
        clock.t = 1000.0 + step
        job(Progress("train", step, 600, "steps", f"epoch 1/2, step {step}/300"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5  # at 60, 120, ... 300 s: not one a step
    assert (
        lines[0] == "train: 60/600 steps (10%), 1 steps/s, ETA 9 min 00 s [epoch 1/2, step 60/300]"
    )
    assert lines[-1].startswith("train: 300/600 steps (50%), 1 steps/s, ETA 5 min 00 s")


def test_log_lines_name_the_inner_task_and_a_long_silence(caplog):
    clock = Clock()
    job = pp.JobProgress("attack", None, display=pp.LogLines(60, clock), clock=clock)
    caplog.set_level(logging.INFO, logger="kdiga.pipeline.progress")
    job(Progress("pgd sweep", 0, 4, "attacks"))
    clock.t += 30
    job(Progress("pgd sweep", 1, 4, "attacks", "batch 1/2, radius 0.1"))
    job(Progress("autoattack apgd-t", 0, 50, "samples", "eps 0.1"))
    clock.t += 200  # nothing for a while: the heartbeat thread's tick still logs
    job.display.tick(job, clock.t)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("pgd sweep: 1/4 attacks (25%), 2 attacks/min, ETA 0 s")
    assert "; now autoattack apgd-t 0/50 samples (eps 0.1); last update 3 min 20 s ago" in line


def test_the_terminal_display_is_a_tqdm_bar_per_task(monkeypatch):
    stream = io.StringIO()
    stream.isatty = lambda: True
    monkeypatch.delenv(pp.MODE_ENV, raising=False)
    display = pp.display_for(stream)
    assert isinstance(display, pp.Bars)
    job = pp.JobProgress("attack", None, display=display)
    job(Progress("pgd sweep", 0, 4, "attacks"))
    job(Progress("pgd sweep", 3, 4, "attacks", "batch 2/2, radius 0.05"))
    for done in (0, 5, 10):
        job(Progress("autoattack apgd-ce", done, 10, "samples"))
    job(Progress("autoattack apgd-ce", 2, 6, "samples"))  # the stage again: the bar resets
    bars = display.bars
    assert all(isinstance(b, tqdm) for b in bars.values())
    assert (bars["pgd sweep"].n, bars["pgd sweep"].total) == (3, 4)
    assert (bars["autoattack apgd-ce"].n, bars["autoattack apgd-ce"].total) == (2, 6)
    job.close()
    out = stream.getvalue()
    assert "pgd sweep:  75%" in out and "batch 2/2, radius 0.05" in out


def test_the_mode_is_chosen_by_the_terminal_or_the_environment(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.delenv(pp.MODE_ENV, raising=False)
    monkeypatch.setenv(pp.INTERVAL_ENV, "5")
    lines = pp.display_for(pipe)
    assert isinstance(lines, pp.LogLines) and lines.interval == 5
    monkeypatch.setenv(pp.MODE_ENV, "off")
    assert pp.display_for(pipe) is None
    monkeypatch.setenv(pp.MODE_ENV, "bar")
    bars = pp.display_for(pipe)
    assert isinstance(bars, pp.Bars)
    bars.close()
    monkeypatch.setenv(pp.MODE_ENV, "log")
    monkeypatch.setenv(pp.INTERVAL_ENV, "soon")
    assert pp.display_for(pipe).interval == pp.INTERVAL_S  # a bad value: the default


def test_the_progress_file_is_throttled_and_ends_done_or_failed(tmp_path):
    clock = Clock()
    path = tmp_path / "logs" / "distill" / "m.progress.json"
    job = pp.JobProgress("distill", path, job="distill-m", clock=clock, heartbeat=10)
    job.write()
    first = json.loads(path.read_text())
    assert first["state"] == "running" and first["step"] == "starting" and first["done"] is None
    for t, done in ((0.5, 1), (1.5, 2), (2.6, 3), (3.0, 4)):
        clock.t = 1000.0 + t
        job(Progress("train", done, 10, "steps", f"epoch 1/1, step {done}/10"))
        seen = json.loads(path.read_text())
        assert seen["done"] == {0.5: None, 1.5: None, 2.6: 3, 3.0: 3}[t]  # once every 2 s
    assert seen["rate"] == pytest.approx(2 / 2.1) and seen["eta_s"] == pytest.approx(7 * 2.1 / 2)
    assert seen["heartbeat"] == pp.iso(1002.6) and seen["started"] == pp.iso(1000.0)
    assert (seen["stage"], seen["job"], seen["heartbeat_s"]) == ("distill", "distill-m", 10.0)
    clock.t = 1004.0
    job.close(NotImplementedError("no such loss\nmore detail"))
    failed = json.loads(path.read_text())
    assert failed["state"] == "failed"
    assert failed["error"] == "NotImplementedError: no such loss"
    assert failed["step"] == "train 4/10 steps (epoch 1/1, step 4/10)"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left


def test_the_heartbeat_thread_keeps_the_file_fresh_while_the_job_is_busy(tmp_path):
    path = tmp_path / "x.progress.json"
    job = pp.JobProgress("teacher", path, heartbeat=0.05).start()
    first = json.loads(path.read_text())["heartbeat"]
    beat = threading.Event()
    for _ in range(100):
        if json.loads(path.read_text())["heartbeat"] != first:
            beat.set()
            break
        beat.wait(0.02)
    job.close()
    assert beat.is_set() and json.loads(path.read_text())["state"] == "done"
    assert not job._thread.is_alive()


def test_a_launcher_leaves_the_file_to_its_worker_and_keeps_its_account(tmp_path):
    """A distill job run again as torchrun workers: rank 0 keeps the file while it beats;
    the launcher's last write keeps where the worker got and the worker's error."""
    path, clock = tmp_path / "d.progress.json", Clock(time.time())
    launcher = pp.JobProgress("distill", path, clock=clock)
    launcher.write()
    assert launcher._other_writer() is None  # its own file
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        worker = pp.JobProgress("distill", path, clock=clock)
        worker.pid = sleeper.pid  # another live process of this host
        worker(Progress("train", 5, 10, "steps", "epoch 1/2, step 5/5"))
        assert launcher._other_writer()["done"] == 5  # the launcher's heartbeat stands aside
        clock.t += 2 * worker.heartbeat + 1
        assert launcher._other_writer() is None  # a silent worker: the launcher beats again
        worker.close(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    finally:
        sleeper.kill()
        sleeper.wait()
    launcher.close(RuntimeError("torchrun failed with exit code 1"))
    info = pp.read_progress(path)
    assert (info["pid"], info["state"], info["done"]) == (os.getpid(), "failed", 5)
    assert info["step"] == "train 5/10 steps (epoch 1/2, step 5/5)"
    assert info["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_the_main_task_is_the_first_unfinished_one():
    clock = Clock()
    job = pp.JobProgress("shard", None, clock=clock)
    job(Progress("shard train", 10, 10, "images"))
    job(Progress("shard val", 2, 5, "images"))
    job(Progress("shard test", 0, 5, "images"))
    assert job.main().event.task == "shard val" and job.latest.event.task == "shard test"
    job(Progress("shard val", 5, 5, "images"))
    assert job.main().event.task == "shard test"


def _stage(tmp_path, monkeypatch, body) -> tuple[int, dict]:
    """common.run of a stage whose body is ``body``, with a log file; its progress file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDIGA_PARAMS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    threads = torch.get_num_threads()
    try:
        code = run("bounds", "test", body, ["--log", "logs/bounds/m.log"])
    finally:
        torch.set_num_threads(threads)
    return code, json.loads((tmp_path / "logs" / "bounds" / "m.progress.json").read_text())


def test_run_marks_the_job_done_with_its_last_step(tmp_path, monkeypatch):
    code, info = _stage(tmp_path, monkeypatch, lambda args, params: None)
    assert code == 0 and info["state"] == "done" and info["error"] is None
    assert info["step"] == "starting" and info["task"] is None

    def counted(args, params):
        for done in range(4):
            args.progress(Progress("bounds", done, 3, "ascents", f"batch {done}/3"))

    code, info = _stage(tmp_path, monkeypatch, counted)
    assert code == 0 and (info["state"], info["done"], info["total"]) == ("done", 3, 3)
    assert info["job"] == "bounds-m" and info["step"] == "bounds 3/3 ascents (batch 3/3)"
    assert info["eta_s"] == 0


def test_run_marks_a_failed_job_with_its_step_and_first_error_line(tmp_path, monkeypatch):
    from kdiga.models import CheckpointError

    def user_error(args, params):
        args.progress(Progress("bounds", 1, 3, "ascents", "batch 1/3, radius 0.1"))
        raise CheckpointError("x.safetensors: truncated\nsecond line")

    code, info = _stage(tmp_path, monkeypatch, user_error)
    assert code == 2 and info["state"] == "failed"
    assert info["error"] == "CheckpointError: x.safetensors: truncated"
    assert info["step"] == "bounds 1/3 ascents (batch 1/3, radius 0.1)"

    def bug(args, params):
        raise KeyError("epoch")

    with pytest.raises(KeyError):
        _stage(tmp_path, monkeypatch, bug)
    info = json.loads((tmp_path / "logs" / "bounds" / "m.progress.json").read_text())
    assert (info["state"], info["error"], info["step"]) == (
        "failed",
        "KeyError: 'epoch'",
        "starting",
    )


@pytest.mark.parametrize(("code", "state"), [(0, "done"), (None, "done"), (3, "failed")])
def test_a_body_that_exits_ends_by_its_exit_code(tmp_path, monkeypatch, code, state):
    def leaves(args, params):
        raise SystemExit(code)

    with pytest.raises(SystemExit):
        _stage(tmp_path, monkeypatch, leaves)
    info = json.loads((tmp_path / "logs" / "bounds" / "m.progress.json").read_text())
    assert (info["state"], info["error"]) == (state, "SystemExit: 3" if code == 3 else None)


def test_only_rank_0_of_a_torchrun_job_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    job = pp.start_job("distill", str(tmp_path / "logs" / "distill" / "m.log"))
    job(Progress("train", 1, 2, "steps"))
    job.close()
    assert not (tmp_path / "logs").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(pp.MODE_ENV, "off")
    job = pp.start_job("distill", str(tmp_path / "logs" / "distill" / "a.b--s0.log"))
    job.close()
    assert pp.read_progress(tmp_path / "logs" / "distill" / "a.b--s0.progress.json")["job"] == (
        "distill-a.b--s0"
    )


def test_durations_and_rates_read_as_a_person_writes_them():
    seconds = (None, math.inf, 0, 0.3, 4.4, 185, 7620, 4 * 86400 + 3 * 3600)
    assert [pp.duration(s) for s in seconds] == [
        "-",
        "-",
        "0 s",
        "<1 s",
        "4 s",
        "3 min 05 s",
        "2 h 07 min",
        "4 d 03 h",
    ]
    assert pp.rate_text(2.5, "steps") == "2.5 steps/s"
    assert pp.rate_text(0.05, "attacks") == "3 attacks/min"
    assert pp.rate_text(1 / 7200, "attacks") == "0.5 attacks/h"
    assert pp.rate_text(None, "steps") == "rate not known yet"
    assert pp.progress_path("attack", "m--pgd") == "logs/attack/m--pgd.progress.json"
    assert pp.progress_path("shard") == "logs/shard.progress.json"


def test_a_progress_temporary_left_by_a_killed_job_is_removed_by_the_next_one(tmp_path):
    """A job killed (SIGKILL) between writing its progress temporary and renaming it leaves
    the temporary; the next job of that file removes it on its first write, and leaves
    those of live processes."""
    path = tmp_path / "logs" / "distill" / "m.progress.json"
    path.parent.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()  # a pid no process has now
    host = temporary_prefix(path.name).split("@")[1].rstrip(".")
    stale = path.with_name(f".{path.name}.{dead}@{host}.progress.tmp")
    live = path.with_name(f".{path.name}.{os.getppid()}@{host}.progress.tmp")
    stale.write_text("{")
    live.write_text("{")
    pp.JobProgress("distill", path, job="distill-m").write()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, live.name])
