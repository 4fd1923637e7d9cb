"""Stage shard: a dataset into WebDataset tar shards (train / val / test) with manifests.

The validation split is cut from train (for tuning); the test split is only ever evaluated.
The output directory appears whole or not at all: shards are written beside it and moved in;
the folder a killed run (``kill -9``) left there is removed by the next run.

Small datasets are written as arrays of their resized pixels and read whole into memory, by
this stage and every stage after it: before loading one, the stage estimates its images' size
(images x channels x image_size^2 bytes) and refuses it over ``shard.max_gb``.
ImageNet (any ImageFolder root, ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``) is
written as shards of its original image files (``kdiga.stream``; ``shard.resize_short`` to
store them smaller): train and val from the train folder, the test subset from the val
folder (the paper's test images), each manifest marked ``"encoding": "image"``. Training
streams the train shards; val and test are decoded into memory with the evaluation view.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from kdiga.data import load_dataset, seeded_subset, split_indices
from kdiga.files import current_umask, remove_stale_temporaries, temporary_prefix
from kdiga.shards import write_manifest, write_shards
from kdiga.stream import list_image_folder, write_image_shards
from pipeline import dag
from pipeline.params import (
    ParamError,
    Shard,
    Study,
    test_images,
    val_fraction_problem,
)
from pipeline.provenance import digest
from pipeline.stages.common import begin, log, run, write_json


def in_memory_images(s: Shard) -> int:
    """The images of the splits a small dataset holds in memory: train (with its validation
    cut) and the test subset."""
    return s.info.train_images + test_images(s)


def check_memory(s: Shard, images: int) -> None:
    """Refuse, before they are loaded, ``images`` held in memory at ``shard.image_size`` that
    would pass ``shard.max_gb`` (images x channels x image_size^2 bytes)."""
    need = images * s.info.channels * s.image_size**2 / 1e9
    if need > s.max_gb:
        raise ParamError(
            "shard.image_size",
            s.image_size,
            f"{images} {s.dataset} images at {s.image_size}x{s.image_size} hold about "
            f"{need:.1f} GB in memory (images x channels x size^2 bytes), over the budget "
            f"shard.max_gb = {s.max_gb:g}: use a smaller image_size, or raise shard.max_gb "
            "where the memory is",
        )


def _splits(s: Shard) -> dict:
    check_memory(s, in_memory_images(s))
    seed = s.seed
    kw = {"root": s.root, "image_size": s.image_size}
    train_x, train_y = load_dataset(s.dataset, "train", seed=seed, **kw)
    test_x, test_y = load_dataset(s.dataset, "test", n=s.test_samples, seed=seed, **kw)
    keep, val = split_indices(train_y, s.val_fraction, seed=seed)
    return {
        "train": (train_x[keep], train_y[keep]),
        "val": (train_x[val], train_y[val]),
        "test": (test_x, test_y),
    }


def _folder_splits(s: Shard, out: Path, progress: Callable | None = None) -> None:
    """ImageNet / an ImageFolder root as shards of its image files, with their manifests."""
    root = Path(s.root)
    train, classes = list_image_folder(root / "train")
    test, test_classes = list_image_folder(root / "val")
    if len(classes) != s.classes:
        raise ParamError(
            "shard.num_classes",
            s.num_classes,
            f"{root / 'train'} has {len(classes)} class folders, the study expects {s.classes}: "
            f"set shard.num_classes: {len(classes)} (null means {s.dataset}'s own)",
        )
    if test_classes != classes:
        missing = sorted(set(classes) ^ set(test_classes))[:3]
        raise ParamError(
            "shard.root",
            s.root,
            f"{root / 'val'} must hold the same class folders as "
            f"{root / 'train'} (labels are their sorted order); they differ at {missing}",
        )
    labels = torch.tensor([c for _, c in train])
    problem = val_fraction_problem(s.val_fraction, labels.bincount().tolist())
    if problem:  # the schema knows the sizes of the other datasets; this one's are known now
        raise ParamError("shard.val_fraction", s.val_fraction, f"{root / 'train'}: {problem}")
    keep, val = split_indices(labels, s.val_fraction, seed=s.seed)
    n_test = len(test) if s.test_samples is None else min(s.test_samples, len(test))
    check_memory(s, val.numel() + n_test)  # val and test are decoded into memory to evaluate
    test_idx = seeded_subset(len(test), n_test, s.seed)
    plan = {  # split: (folder, listing, indices, shuffled write order)
        "train": (root / "train", train, keep, True),
        "val": (root / "train", train, val, False),
        "test": (root / "val", test, test_idx, False),
    }
    for split, (folder, listing, idx, shuffle) in plan.items():
        if idx.numel() == 0:
            raise ParamError(
                "shard.val_fraction" if split == "val" else "shard.root",
                None,
                f"the {split} split of {folder} would be empty",
            )
        entries = write_image_shards(
            folder,
            out,
            prefix=split,
            max_per_shard=s.max_per_shard,
            resize_short=s.resize_short,
            indices=idx.tolist(),
            shuffle_seed=s.seed if shuffle else None,
            progress=progress,
        )
        ys = labels[idx] if folder.name == "train" else torch.tensor([listing[i][1] for i in idx])
        write_manifest(
            entries,
            out / f"{split}.json",
            dataset=s.dataset,
            split=split,
            encoding="image",
            image_size=s.image_size,
            channels=3,
            num_classes=s.classes,
            class_counts=[int((ys == c).sum()) for c in range(s.classes)],
            classes=classes,
        )
        log.info("%s: %d images in %d shard(s)", split, len(idx), len(entries))


#: the temporary folders of an older kdiga's shard jobs, which named no writer
_UNNAMED_TEMPORARIES = ".shards-*"


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders that killed shard jobs left beside ``out``: those of a
    writer no longer running (:func:`kdiga.files.remove_stale_temporaries`), and the
    ``.shards-*`` of an older kdiga, which did not name their writer (a study has one shard
    job, and a run of it waits for no other: what is there was left behind)."""
    gone = remove_stale_temporaries(out, suffix="")
    for old in sorted(out.parent.glob(_UNNAMED_TEMPORARIES)):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
            gone.append(old)
    for path in gone:
        log.info("removed %s, left by an interrupted shard job", path)


def body(args: argparse.Namespace, params: Study) -> None:
    s = params.shard
    classes = s.classes
    provenance = begin(params, "shard")
    out = Path(dag.SHARDS)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temporary_prefix(out.name)))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; results are shared
    try:
        for split, (x, y) in ({} if s.streamed else _splits(s)).items():
            entries = write_shards(
                x, y, tmp, prefix=split, max_per_shard=s.max_per_shard, progress=args.progress
            )
            write_manifest(
                entries,
                tmp / f"{split}.json",
                dataset=s.dataset,
                split=split,
                image_size=int(x.shape[-1]),
                channels=int(x.shape[1]),
                num_classes=classes,
                class_counts=[int((y == c).sum()) for c in range(classes)],
            )
            log.info("%s: %d images in %d shard(s)", split, len(y), len(entries))
        if s.streamed:
            _folder_splits(s, tmp, args.progress)
        # the manifests' hash, as it will be once the directory is in place
        write_json(provenance | {"outputs": {dag.SHARDS: digest(tmp)}}, tmp / "provenance.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    return run("shard", "Write the dataset as WebDataset shards.", body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
