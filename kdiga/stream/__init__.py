"""ImageNet-scale data: shards of the original JPEG bytes, streamed, decoded by the workers.

ImageNet's 1.28M training images do not fit in memory, and decoding them once into arrays
would multiply their size by ten. The shards here hold each image's file bytes unchanged.

Writing (:mod:`kdiga.stream.write`)
-----------------------------------
:func:`write_image_shards` turns an ImageFolder split (``<split_dir>/<class>/<file>``, class
index = position of the folder name in sorted order, exactly as torchvision's ``ImageFolder``:
:func:`list_image_folder`) into WebDataset tars. A sample is ``<key>.jpg`` (or ``<key>.png``,
by the file's real format) plus ``<key>.cls`` (the label as decimal text); the key is the
image's index in the ``ImageFolder`` listing, zero-padded, so
``ImageFolder(split_dir).samples[int(key)]`` is its source file. Nothing is decoded or
re-encoded unless ``resize_short`` asks for it (:mod:`kdiga.stream.images`). Member metadata
is fixed, so the same input gives the same bytes on every run, and the entries returned go to
:func:`kdiga.shards.write_manifest` unchanged. :func:`write_encoded_shards` writes the same
layout from an iterable of ``(bytes, ext, label)``.

Reading: :func:`stream_loader` (:mod:`kdiga.stream.loader`)
-----------------------------------------------------------
DataLoader workers (:mod:`kdiga.stream.worker`) read the tars (:mod:`kdiga.stream.tar`),
decode and augment (:mod:`kdiga.stream.views`: :func:`eval_view`, the training crop and
flip); the loader yields uint8 batches ``x [B, 3, S, S]`` and int64 labels ``y [B]``. Which
shards each rank's workers read, and the steps of an epoch, are the rule of
:mod:`kdiga.stream.plan`; evaluation batches are padded with rows labelled
:data:`PAD_LABEL`. An epoch can be resumed mid-way, and JPEGs decoded on the GPU
(:func:`decode_jpeg_batch`): see :mod:`kdiga.stream.loader`.

Errors: a file that is not a decodable JPEG or PNG (when writing), and a missing, truncated
or corrupt shard or sample (when reading), raise :class:`kdiga.shards.ShardError` naming the
file, or the shard and the sample.
"""

from kdiga.stream.folder import list_image_folder
from kdiga.stream.loader import ShardBatches, load_image_split, stream_loader
from kdiga.stream.views import decode_jpeg_batch, eval_view
from kdiga.stream.worker import PAD_LABEL
from kdiga.stream.write import write_encoded_shards, write_image_shards

__all__ = [
    "PAD_LABEL",
    "ShardBatches",
    "decode_jpeg_batch",
    "eval_view",
    "list_image_folder",
    "load_image_split",
    "stream_loader",
    "write_encoded_shards",
    "write_image_shards",
]
