"""Stage shard: a dataset into WebDataset tar shards (train / val / test) with manifests.

The validation split is cut from train (for tuning); the test split is only ever evaluated.
The output directory appears whole or not at all: shards are written beside it and moved in.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from pipeline import dag
from pipeline.common import begin, log, run, write_json
from pipeline.params import DATASET_CLASSES, ParamError, Shard, Study
from pipeline.provenance import digest


def _splits(s: Shard) -> dict:
    from kdiga.data import load_dataset, split_indices

    seed = s.seed
    kw = {"root": s.root, "image_size": s.image_size}
    if s.dataset == "imagenet":
        raise ParamError(
            "shard.dataset",
            "imagenet",
            "this version shards a split by holding it in memory, "
            "which ImageNet's training set does not fit; streaming shard writing and training "
            "(kdiga.shards.shard_dataset) are not wired into the pipeline yet",
        )
    train_x, train_y = load_dataset(s.dataset, "train", seed=seed, **kw)
    test_x, test_y = load_dataset(s.dataset, "test", n=s.test_samples, seed=seed, **kw)
    keep, val = split_indices(train_y, s.val_fraction, seed=seed)
    return {
        "train": (train_x[keep], train_y[keep]),
        "val": (train_x[val], train_y[val]),
        "test": (test_x, test_y),
    }


def body(args: argparse.Namespace, params: Study) -> None:
    from kdiga.shards import write_manifest, write_shards
    from kdiga.utils import current_umask

    s = params.shard
    classes = DATASET_CLASSES[s.dataset]
    provenance = begin(params, "shard")
    out = Path(dag.SHARDS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".shards-"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; results are shared
    try:
        for split, (x, y) in _splits(s).items():
            entries = write_shards(x, y, tmp, prefix=split, max_per_shard=s.max_per_shard)
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
