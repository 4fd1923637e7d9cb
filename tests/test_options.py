"""kdiga.options: the datasets' table states what kdiga.data's loaders give."""

from __future__ import annotations

import pytest

from kdiga.data import load_dataset
from kdiga.options import DATASET_INFO


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_the_dataset_table_matches_what_the_loader_gives(name):
    info = DATASET_INFO[name]
    train_x, train_y = load_dataset(name, "train", image_size=8)
    test_x, _ = load_dataset(name, "test", image_size=8)
    assert train_x.shape[1] == test_x.shape[1] == info.channels
    assert tuple(train_y.bincount(minlength=info.classes).tolist()) == info.train_class_counts
    assert (len(train_y), len(test_x)) == (info.train_images, info.test_images)
    assert load_dataset(name, "test", n=4)[0].shape[-1] == info.image_size
