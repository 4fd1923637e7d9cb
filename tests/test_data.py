"""kdiga.data and kdiga.shards: datasets, fixed splits, augmentations, tar shards, streaming."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from kdiga.data import (
    DATASETS,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    DatasetNotFoundError,
    augment,
    imagenet_folder,
    load_dataset,
    split_indices,
    to_float,
)
from kdiga.shards import (
    ShardError,
    load_sharded,
    read_manifest,
    read_shards,
    shard_dataset,
    write_manifest,
    write_shards,
)

# ---------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", "train", image_size=8), load_dataset(
        "digits", "test", image_size=8
    )


def test_digits_is_the_whole_real_set_split_in_two(digits8):
    from sklearn.datasets import load_digits

    (xtr, ytr), (xte, yte) = digits8
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert len(ytr) + len(yte) == 1797
    assert abs(len(yte) - 1797 * DIGITS_TEST_FRACTION) < 10
    # the 8x8 images are sklearn's, scaled 0..16 -> 0..255, at the fixed split's indices
    bunch = load_digits()
    train_idx, test_idx = split_indices(
        torch.as_tensor(bunch.target), DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED
    )
    expected = np.round(bunch.images[test_idx.numpy()] * 255 / 16).astype(np.uint8)
    assert np.array_equal(xte[:, 0].numpy(), expected)
    assert torch.equal(yte, torch.as_tensor(bunch.target[test_idx.numpy()]))
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert xtr.max() == 255 and xtr.min() == 0


def test_digits_split_never_changes_with_other_params(digits8):
    (_, ytr), (_, yte) = digits8
    _, yte16 = load_dataset("digits", "test")
    _, yte_seed = load_dataset("digits", "test", image_size=12, seed=7)
    _, ytr16 = load_dataset("digits", "train", channels=3)
    assert torch.equal(yte, yte16) and torch.equal(yte, yte_seed) and torch.equal(ytr, ytr16)
    # the class proportions are kept (stratified)
    share = torch.bincount(yte, minlength=10) / len(yte)
    assert torch.all((share - 0.1).abs() < 0.02)


def test_digits_upsampled_shapes_and_channels():
    x, y = load_dataset("digits", "test", image_size=16, channels=3)
    assert x.shape == (len(y), 3, 16, 16) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 2])
    small, _ = load_dataset("digits", "test", image_size=8)
    # bilinear upsampling keeps the image's mean brightness to within rounding
    assert (x[:, :1].float().mean((1, 2, 3)) - small.float().mean((1, 2, 3))).abs().max() < 3


def test_digits_subset_is_fixed_and_a_subset(digits8):
    (xtr, _), _ = digits8
    a, _ = load_dataset("digits", "train", image_size=8, n=50, seed=3)
    b, _ = load_dataset("digits", "train", image_size=8, n=50, seed=3)
    c, _ = load_dataset("digits", "train", image_size=8, n=50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape[0] == 50
    rows = {bytes(r) for r in xtr.numpy().reshape(len(xtr), -1)}
    assert all(bytes(r) in rows for r in a.numpy().reshape(50, -1))


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=200),
    fraction=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31),
)
def test_split_indices_is_a_stratified_partition(labels, fraction, seed):
    y = torch.tensor(labels)
    keep, held = split_indices(y, fraction, seed)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(labels)))
    for c in set(labels):
        n_c = labels.count(c)
        assert int((y[held] == c).sum()) == round(fraction * n_c)
    keep2, held2 = split_indices(y, fraction, seed)
    assert torch.equal(keep, keep2) and torch.equal(held, held2)


def test_split_indices_unstratified_and_bad_input():
    y = torch.zeros(100, dtype=torch.long)
    y[:10] = 1
    keep, held = split_indices(y, 0.2, 0, stratify=False)
    assert len(held) == 20 and len(keep) == 80
    with pytest.raises(ValueError, match="fraction"):
        split_indices(y, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        split_indices(y.view(10, 10), 0.1)


def test_synthetic_is_deterministic_and_learnable_shape():
    a = load_dataset("synthetic", "train", n=40, image_size=6, channels=2, num_classes=4, seed=1)
    b = load_dataset("synthetic", "train", n=40, image_size=6, channels=2, num_classes=4, seed=1)
    t = load_dataset("synthetic", "test", n=40, image_size=6, channels=2, num_classes=4, seed=1)
    other = load_dataset("synthetic", "train", n=40, image_size=6, channels=2, num_classes=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], t[0]) and not torch.equal(a[0], other[0])
    assert a[0].shape == (40, 2, 6, 6) and a[0].dtype == torch.uint8
    assert torch.equal(torch.bincount(a[1]), torch.full((4,), 10))
    # class-dependent: a sample is closer to its class mean than to the other classes' means
    x = a[0].float().flatten(1)
    means = torch.stack([x[a[1] == c].mean(0) for c in range(4)])
    assert (torch.cdist(x, means).argmin(1) == a[1]).float().mean() > 0.9


def test_unknown_dataset_and_bad_arguments():
    with pytest.raises(ValueError, match=r"digits.*cifar10.*imagenet.*synthetic"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")
    with pytest.raises(ValueError, match="channels"):
        load_dataset("digits", "train", channels=2)
    with pytest.raises(ValueError, match="channels"):
        load_dataset("cifar10", "train", channels=1)
    assert DATASETS == ("digits", "cifar10", "imagenet", "synthetic")


def test_cifar10_missing_root_is_a_clear_error_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", "train", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and "cifar-10-batches-py" in msg and "download=True" in msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="root="):
        load_dataset("cifar10", "test")
    assert not any(tmp_path.iterdir())  # nothing was fetched


def test_imagenet_folder_and_fixed_subset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for wnid in ("n01", "n02"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(2):
            arr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "val" / wnid / f"{i}.png")
    ds = imagenet_folder(tmp_path, "val", resize=36, crop=32)
    img, label = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == 1
    x, y = load_dataset("imagenet", "test", root=tmp_path, n=3, image_size=32)
    x2, y2 = load_dataset("imagenet", "val", root=tmp_path, n=3, image_size=32)
    assert x.shape == (3, 3, 32, 32) and torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="n="):
        load_dataset("imagenet", "test", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="train"):
        imagenet_folder(tmp_path, "train")


# ---------------------------------------------------------------------------- augmentation


def _windows(x: torch.Tensor, pad: int) -> torch.Tensor:
    """All (2p+1)^2 crops of the zero-padded x: [K, B, C, H, W]."""
    h, w = x.shape[-2:]
    p = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    return torch.stack(
        [p[..., i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    )


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_crop_is_a_window_of_the_padded_image(kind):
    x = torch.rand(64, 2, 6, 6)
    out = augment(x, kind, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape
    plain = (_windows(x, 2) == out).flatten(2).all(2).any(0)  # [B]
    flipped = (_windows(x.flip(-1), 2) == out).flatten(2).all(2).any(0)
    assert torch.all(plain | flipped)
    if kind == "crop":
        assert torch.all(plain)
    else:
        assert (~plain).sum() > 10  # about half are mirrored
    assert not torch.equal(out, x)


def test_augment_reproducible_and_validated():
    x = torch.randint(0, 256, (8, 3, 5, 5), dtype=torch.uint8)
    a = augment(x, "crop_flip", torch.Generator().manual_seed(1))
    b = augment(x, "crop_flip", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.uint8
    assert augment(x, "none", None) is x
    with pytest.raises(ValueError, match="crop_flip"):
        augment(x, "flip", None)
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment(x[0], "crop", None)


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(to_float(x).flatten(), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(ValueError, match="uint8"):
        to_float(x.long())


# ---------------------------------------------------------------------------- shards


@pytest.fixture
def small_set():
    return load_dataset("synthetic", "train", n=23, image_size=5, channels=3, seed=2)


@pytest.mark.parametrize("fmt", ["npy", "png"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shards_round_trip_bit_exact(tmp_path, fmt, channels):
    x, y = load_dataset("synthetic", "train", n=23, image_size=5, channels=channels)
    entries = write_shards(x, y * 37, tmp_path, prefix="train", max_per_shard=10, fmt=fmt)
    assert [e["count"] for e in entries] == [10, 10, 3]
    assert [Path(e["path"]).name for e in entries] == [f"train-00000{i}.tar" for i in range(3)]
    x2, y2 = read_shards(
        [e["path"] for e in entries], sha256={e["path"]: e["sha256"] for e in entries}
    )
    assert torch.equal(x2, x) and torch.equal(y2, y * 37) and x2.dtype == torch.uint8
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_shards_are_byte_identical_across_writes(tmp_path, small_set):
    a = write_shards(*small_set, tmp_path / "a", prefix="s", max_per_shard=8)
    b = write_shards(*small_set, tmp_path / "b", prefix="s", max_per_shard=8)
    assert [e["sha256"] for e in a] == [e["sha256"] for e in b]


def test_write_shards_rejects_bad_input(tmp_path, small_set):
    x, y = small_set
    with pytest.raises(ValueError, match="uint8"):
        write_shards(x.float(), y, tmp_path, prefix="p")
    with pytest.raises(ValueError, match="labels"):
        write_shards(x, y[:-1], tmp_path, prefix="p")
    with pytest.raises(ValueError, match="fmt"):
        write_shards(x, y, tmp_path, prefix="p", fmt="jpg")
    with pytest.raises(ValueError, match="prefix"):
        write_shards(x, y, tmp_path, prefix="a/b")


def _one_shard(tmp_path, small_set):
    (entry,) = write_shards(*small_set, tmp_path / "src", prefix="s")
    return Path(entry["path"]), entry


def _expect_shard_error(path: Path, match: str, **kw) -> None:
    with pytest.raises(ShardError, match=match) as err:
        read_shards([path], **kw)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("cut", [0, 100, 700, 1536, 0.5, "member_boundary"])
def test_truncated_shard_is_a_shard_error(tmp_path, small_set, cut):
    path, _ = _one_shard(tmp_path, small_set)
    raw = path.read_bytes()
    marker_only = cut == "member_boundary"
    if marker_only:  # cut right after the last member: only the marker is lost
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        cut = last.offset_data + ((last.size + 511) // 512) * 512
    elif isinstance(cut, float):
        cut = int(len(raw) * cut)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(raw[:cut])
    _expect_shard_error(bad, "truncated or corrupt" if marker_only else ".")


@pytest.mark.parametrize("pos", [10, 148, 1100, 4000])
def test_flipped_header_bytes_are_a_shard_error(tmp_path, small_set, pos):
    path, _ = _one_shard(tmp_path, small_set)
    with tarfile.open(path) as tar:
        headers = [m.offset for m in tar.getmembers()]
    raw = bytearray(path.read_bytes())
    raw[headers[min(pos // 1000, len(headers) - 1)] + pos % 512] ^= 0xFF
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    _expect_shard_error(bad, ".")


def _flip_last_pixel(path: Path) -> None:
    """Flip one bit of the last image's last pixel: the shard still decodes, to wrong data."""
    with tarfile.open(path) as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".npy")][-1]
    raw = bytearray(path.read_bytes())
    raw[last.offset_data + last.size - 1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_pixel_fails_the_checksum_and_count_mismatch(tmp_path, small_set):
    path, entry = _one_shard(tmp_path, small_set)
    bad = tmp_path / "s-000000.tar"
    shutil.copy(path, bad)
    _flip_last_pixel(bad)
    x, _ = read_shards([bad])  # no checksum: undetectable, by design
    assert not torch.equal(x, small_set[0])
    _expect_shard_error(bad, "sha256", sha256={"s-000000.tar": entry["sha256"]})
    _expect_shard_error(path, "expected 99", counts={str(path): 99})
    _expect_shard_error(path, "no entry", sha256={"other.tar": entry["sha256"]})


def _write_raw(path: Path, samples: list[dict]) -> Path:
    with open(path, "wb") as fh, wds.TarWriter(fh, encoder=False) as sink:
        for s in samples:
            sink.write(s)
    return path


def test_missing_label_or_bad_payload_is_a_shard_error(tmp_path, small_set):
    good = Path(write_shards(*small_set, tmp_path / "src", prefix="s")[0]["path"])
    with tarfile.open(good) as tar:
        npy = tar.extractfile(tar.getmembers()[1]).read()
    no_cls = _write_raw(tmp_path / "no_cls.tar", [{"__key__": "0", "npy": npy}])
    _expect_shard_error(no_cls, "cls")
    bad_npy = _write_raw(tmp_path / "bad_npy.tar", [{"__key__": "0", "npy": b"xx", "cls": b"1"}])
    _expect_shard_error(bad_npy, "does not decode")
    bad_cls = _write_raw(tmp_path / "bad_cls.tar", [{"__key__": "0", "npy": npy, "cls": b"a"}])
    _expect_shard_error(bad_cls, "not an integer")
    _expect_shard_error(tmp_path / "absent.tar", "not found")


def test_manifest_round_trip_and_relocation(tmp_path, small_set):
    entries = write_shards(*small_set, tmp_path / "d" / "shards", prefix="train", max_per_shard=9)
    write_manifest(
        entries, tmp_path / "d" / "manifest.json", dataset="synthetic", image_size=5, channels=3
    )
    shutil.move(tmp_path / "d", tmp_path / "moved")
    x, y, doc = load_sharded(tmp_path / "moved" / "manifest.json")
    assert torch.equal(x, small_set[0]) and torch.equal(y, small_set[1])
    assert doc["num_samples"] == 23 and doc["dataset"] == "synthetic" and doc["channels"] == 3
    raw = json.loads((tmp_path / "moved" / "manifest.json").read_text())
    assert raw["shards"][0]["path"] == "shards/train-000000.tar"
    # a tampered shard is caught through the manifest's checksums
    _flip_last_pixel(Path(doc["shards"][1]["path"]))
    with pytest.raises(ShardError, match="sha256"):
        load_sharded(tmp_path / "moved" / "manifest.json")


def test_bad_manifest(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"m\.json"):
        read_manifest(tmp_path / "m.json")
    with pytest.raises(ShardError, match="not found"):
        read_manifest(tmp_path / "none.json")
    with pytest.raises(ValueError, match="reserved"):
        write_manifest([], tmp_path / "x.json", shards=1)


# ---------------------------------------------------------------------------- streaming


def _stream_labels(urls, num_workers: int, **kw) -> list[int]:
    loader = torch.utils.data.DataLoader(
        shard_dataset(urls, **kw), batch_size=None, num_workers=num_workers
    )
    return [int(label) for _, label in loader]


@pytest.fixture
def four_shards(tmp_path):
    x = torch.randint(0, 256, (20, 1, 3, 3), dtype=torch.uint8)
    entries = write_shards(x, torch.arange(20), tmp_path, prefix="s", max_per_shard=5)
    return [e["path"] for e in entries], x


def test_streaming_two_workers_each_sample_once(four_shards):
    urls, x = four_shards
    labels = _stream_labels(urls, num_workers=2)
    assert sorted(labels) == list(range(20))
    loader = torch.utils.data.DataLoader(shard_dataset(urls), batch_size=None, num_workers=2)
    for image, label in loader:
        assert torch.equal(image, x[label])


def test_streaming_split_by_node(four_shards, monkeypatch):
    urls, _ = four_shards
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(_stream_labels(urls, num_workers=2))
    assert len(seen[0]) == len(seen[1]) == 10
    assert sorted(seen[0] + seen[1]) == list(range(20))


def test_streaming_shuffle_is_seeded_by_seed_and_epoch(four_shards):
    urls, _ = four_shards
    plain = _stream_labels(urls, 0)
    a = _stream_labels(urls, 0, shuffle=8, seed=1, epoch=0)
    b = _stream_labels(urls, 0, shuffle=8, seed=1, epoch=0)
    c = _stream_labels(urls, 0, shuffle=8, seed=1, epoch=1)
    assert plain == list(range(20))
    assert a == b and sorted(a) == plain and a != plain and c != a


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    dtype=st.sampled_from(["uint8", "<i4", ">f8", "<f2", "bool"]),
    fortran=st.booleans(),
    version=st.sampled_from([(1, 0), (2, 0), (3, 0)]),
)
def test_npy_decode_equals_np_load(shape, dtype, fortran, version):
    """The cached-header .npy reader returns what np.load returns, for any header."""
    import io

    from kdiga.shards import _decode_npy

    rng = np.random.default_rng(len(shape))
    arr = (rng.random(shape) * 200).astype(dtype)
    arr = np.asfortranarray(arr) if fortran else arr
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    data = buf.getvalue()
    for _ in range(2):  # the second read hits the header cache
        out = _decode_npy(data)
        ref = np.load(io.BytesIO(data), allow_pickle=False)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert np.array_equal(out, ref) and out.flags.writeable


def test_npy_decode_refuses_short_long_and_object_payloads():
    import io

    from kdiga.shards import _decode_npy

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((3, 4, 4), np.uint8))
    data = buf.getvalue()
    for bad in (data[:-1], data + b"\0", b"\x93NUMPY"):
        with pytest.raises(ValueError):
            _decode_npy(bad)
    obj = io.BytesIO()
    np.lib.format.write_array(obj, np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        _decode_npy(obj.getvalue())
