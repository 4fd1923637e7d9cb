"""An ImageFolder split listed as torchvision lists it, refusing what it should not follow."""

from __future__ import annotations

import operator
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from kdiga.data import DatasetNotFoundError
from kdiga.shards import ShardError


def list_image_folder(split_dir: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(``[(path, class index)]``, class names) of an ImageFolder split, as torchvision lists it.

    Classes are the sorted sub-folder names; files are those with an image extension, in
    torchvision's ``make_dataset`` order, so the list equals ``ImageFolder(split_dir).samples``
    for a folder of plain files and folders. What torchvision would follow or open blindly is
    refused, naming it (nothing is opened while listing): a symlinked folder (its images would
    be trained under the class holding the link; one to ``/`` walks the whole filesystem), a
    symlink leading out of ``split_dir``, and an image name that is not a regular file (a
    FIFO would hang the shard job). A symlink to a regular file inside ``split_dir`` is read.

    Raises:
        DatasetNotFoundError: no such directory, no class folders, or a class without images.
        ShardError: a symlinked folder, a symlink out of ``split_dir``, or a special file.
    """
    root = Path(split_dir)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: no such directory (expected <split_dir>/<class>/*)")
    real = os.path.realpath(root)
    with os.scandir(root) as it:
        entries = sorted(it, key=operator.attrgetter("name"))
    classes = [e.name for e in entries if e.is_dir()]
    if not classes:
        raise DatasetNotFoundError(f"{root}: not an ImageFolder split (no class folders)")
    samples, empty = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        if os.path.islink(folder):
            raise _link_error(folder, real)
        found = [
            (os.path.join(where, f), index)
            for where, files in sorted(_image_files(folder, real))
            for f in sorted(files)
        ]
        samples += found
        if not found:
            empty.append(name)
    if empty:
        raise DatasetNotFoundError(
            f"{root}: not an ImageFolder split (no image files for the classes "
            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}; extensions: "
            f"{', '.join(IMG_EXTENSIONS)})"
        )
    return samples, classes


def _image_files(top: str, real_root: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, names of its image files) for ``top`` and every folder below it, following
    no symlinked folder; an image name that is a special file or a symlink leaving
    ``real_root`` raises ShardError."""
    stack = [top]
    while stack:
        where = stack.pop()
        files = []
        with os.scandir(where) as it:
            for e in it:
                if e.is_symlink():
                    if os.path.isdir(e.path):
                        raise _link_error(e.path, real_root)
                    if e.name.lower().endswith(IMG_EXTENSIONS):
                        _check_linked_file(e.path, real_root)
                        files.append(e.name)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    if not e.is_file(follow_symlinks=False):
                        raise ShardError(
                            f"{e.path}: {_kind(e.path)} named like an image, not a regular file: "
                            "remove it from the ImageFolder (reading it could block forever)"
                        )
                    files.append(e.name)
        yield where, files


def _kind(path: str) -> str:
    mode = os.lstat(path).st_mode
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def _link_error(path: str, real_root: str) -> ShardError:
    return ShardError(
        f"{path}: a symlink to the folder {os.path.realpath(path)}; an ImageFolder class holds "
        f"files, and symlinked folders are not followed (under {real_root} its images would "
        "be trained as this class): remove the link, or copy the images in"
    )


def _check_linked_file(path: str, real_root: str) -> None:
    target = os.path.realpath(path)
    if os.path.commonpath([real_root, target]) != real_root:
        raise ShardError(
            f"{path}: a symlink to {target}, out of the ImageFolder {real_root}; no link out "
            "of it is followed: copy the file in, or remove the link"
        )
    if not os.path.isfile(target):
        what = "nothing (a broken link)" if not os.path.lexists(target) else _kind(target)
        raise ShardError(f"{path}: a symlink to {what}, not an image file: remove it")
