"""Training streamed from JPEG shards (kdiga.stream.ShardBatches) with kdiga.train.fit: a run
SIGKILLed mid-epoch and run again ends with the same weights as one never interrupted, with
2 DataLoader workers decoding and augmenting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import io, logging, os, signal, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    from PIL import Image
    from torch import nn
    import torch.nn.functional as F
    from kdiga.shards import write_manifest
    from kdiga.stream import ShardBatches, write_encoded_shards
    from kdiga.train import TrainConfig, fit

    class NoisyCE(nn.Module):  # draws from the global RNG, like a PGD random start
        def forward(self, student, teacher, x, y):
            x = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
            loss = F.cross_entropy(student(x), y)
            return {"loss": loss, "ce": loss.detach()}

    def jpegs():
        rng = np.random.default_rng(0)
        for i in range(96):
            label = i % 4
            pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            pixels[..., label % 3] = 60 * label
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
            yield buf.getvalue(), "jpg", label

    manifest = "shards/train.json"
    if not os.path.exists(manifest):
        entries = write_encoded_shards(jpegs(), "shards", prefix="train", max_per_shard=16)
        write_manifest(entries, manifest, image_size=16, channels=3, num_classes=4)

    def on_batch(info):
        if os.environ.get("KILL_AT") and (info["epoch"], info["batch"]) == (2, 3):
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(epochs=3, batch_size=12, lr=0.05, milestones=(2,), checkpoint_every=2)
    for ckpt, out in zip(sys.argv[1::2], sys.argv[2::2]):  # one run per (checkpoint, output)
        stream = ShardBatches(manifest, batch_size=12, image_size=16, workers=2, seed=0,
                              shuffle_buffer=16)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(768, 32), nn.ReLU(), nn.Dropout(0.2),
                              nn.Linear(32, 4))
        fit(model, NoisyCE(), None, None, cfg, stream=stream, checkpoint_path=ckpt,
            on_batch=on_batch)
        torch.save(model.state_dict(), out)
    """
)


@pytest.mark.slow
def test_sigkill_mid_epoch_of_a_streamed_run_then_rerun_gives_the_same_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*names: str, kill: bool) -> subprocess.CompletedProcess:
        extra = {"KILL_AT": "1"} if kill else {}
        return subprocess.run(
            [sys.executable, str(script), *(str(tmp_path / n) for n in names)],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    killed = run("k.pt", "k_final.pt", kill=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "k_final.pt").exists()
    ckpt = torch.load(tmp_path / "k.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["position"]["batch"]) == (1, 2)  # 96 // 12 = 8 steps an epoch
    rerun = run("k.pt", "k_final.pt", "w.pt", "w_final.pt", kill=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr and "step 2" in rerun.stderr
    a = torch.load(tmp_path / "k_final.pt", weights_only=True)
    b = torch.load(tmp_path / "w_final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
