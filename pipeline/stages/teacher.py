"""Stage teacher: fetch one of the study's teachers (file, url, timm) or train it (PGD-AT or
TRADES): ``python -m pipeline.stages teacher --teacher <name>``.

Writes the teacher as a kdiga model file and its metadata (architecture, normalisation,
source, sha256, clean accuracy on validation and test). Its robust accuracy comes from the
attack stage, with exactly the students' attacks: the bracketed numbers of the report.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from kdiga.files import sha256_file
from kdiga.methods import build_loss
from kdiga.models import CheckpointError, build_model, save_model
from kdiga.models.io import model_spec
from kdiga.shards import read_manifest
from kdiga.teachers import DownloadTooLargeError, load_teacher
from kdiga.train import evaluate, fit
from kdiga.utils import seed_everything
from pipeline import dag
from pipeline.params import ParamError, Study, Teacher, check_teacher, check_train_shards
from pipeline.provenance import seal
from pipeline.stages.common import (
    begin,
    checkpoint_path,
    data_info,
    device,
    load_split,
    log,
    manifest_path,
    run,
    run_record,
    train_config,
    train_data,
    write_json,
    write_timing,
)


def _train(
    params: Study,
    name: str,
    t: Teacher,
    info: dict,
    dev: str,
    val: tuple,
    provenance: dict,
    progress: Callable | None = None,
):
    tr = t.train
    seed_everything(tr.seed)  # the teacher's own seed: its init and every draw of its training
    model = build_model(t.arch, mean=t.mean, std=t.std, **info, **t.arch_kwargs)
    loss_cfg = {"eps": tr.eps, "steps": tr.steps, "step_size": tr.step_size}
    if tr.method == "trades":
        loss_cfg["trades_beta"] = tr.trades_beta
    criterion = build_loss(tr.method, **loss_cfg)
    cfg = train_config(tr, tr.seed)
    if params.shard.streamed:  # before the loader, which would refuse it in a traceback
        check_train_shards(params, read_manifest(manifest_path("train")), ranks=1)
    data, cfg, _ = train_data(params, cfg)
    ckpt = checkpoint_path("teacher", name, provenance)  # what makes it; deleted at the end
    start = time.perf_counter()
    history = fit(
        model,
        criterion,
        cfg=cfg,
        checkpoint_path=ckpt,
        device=dev,
        val=val,
        checkpoint_record=run_record(provenance),
        progress=progress,
        **data,
    )
    seconds = time.perf_counter() - start
    write_timing("teacher", name, seconds=seconds, epoch_s=[r.pop("time_s", None) for r in history])
    return model, {"history": history}, ckpt


def _fetch(name: str, t: Teacher, info: dict):
    """A file, url or timm teacher, checked against what the study declares for it (its
    arch, arch_kwargs and the data's classes, channels and image size)."""
    try:
        return load_teacher(
            t.source,
            arch=t.arch,
            mean=t.mean,
            std=t.std,
            sha256=t.sha256,
            cache_dir="data/teachers/cache",
            model_kwargs=t.arch_kwargs,
            max_download_mb=t.max_mb,
            sha256_key=f"teachers.{name}.sha256",
            **info,
        )
    except DownloadTooLargeError as err:
        raise ParamError(f"teachers.{name}.max_mb", t.max_mb, str(err)) from None
    except CheckpointError:  # a ValueError too, whose line already names the file
        raise
    except ValueError as err:  # a source that names nothing loadable (an unknown timm model)
        raise ParamError(f"teachers.{name}.source", t.source, str(err)) from None


def body(args: argparse.Namespace, params: dict) -> None:
    name = args.teacher
    t = check_teacher(params, name)
    provenance = begin(params, "teacher", name)
    test_x, test_y, manifest = load_split("test")
    val = load_split("val")[:2]
    info = data_info(manifest)
    with device() as dev:
        if t.source == "train":
            model, extra, ckpt = _train(params, name, t, info, dev, val, provenance, args.progress)
            source_sha = None
        else:
            model, meta = _fetch(name, t, info)
            extra, source_sha, ckpt = {}, meta.sha256, None
        accs = {
            s: evaluate(model, *d, device=dev)
            for s, d in (("val", val), ("test", (test_x, test_y)))
        }
    model.cpu()
    path = dag.model_path(name)
    save_model(model, path, meta={"model_id": name, "source": t.source, "provenance": provenance})
    meta = {
        **model_spec(model),
        "name": name,
        "kind": t.kind,
        "source": t.source,
        "source_sha256": source_sha,
        "sha256": sha256_file(path),
        "train": params.value(f"teachers.{name}.train") if t.source == "train" else None,
        "val_acc": accs["val"],
        "clean_acc": accs["test"],
        **extra,
        "provenance": seal(provenance, [path]),
    }
    write_json(meta, dag.teacher_meta_path(name))
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    log.info("teacher %s: clean accuracy %.4f (val %.4f)", name, accs["test"], accs["val"])


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--teacher", required=True, help="a name under teachers in params")

    return run("teacher", "Fetch or train one teacher.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
