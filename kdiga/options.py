"""The library's option lists and the datasets' facts, without torch.

The modules that use a list import it from here, and so does the params schema
(``pipeline/params/``), which loads without torch: a Snakemake dry run, ``python -m
pipeline.dag`` and ``python -m pipeline.sync`` pay no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the threat models of the attacks and the inner maximisations: L∞ and L2 balls in [0, 1]
#: pixel space (kdiga.attacks.pgd)
NORMS = ("linf", "l2")
#: the norms a perturbation is measured in (kdiga.attacks.pgd.perturbation_norm,
#: kdiga.attacks.checks): the threat models, and L1, which AutoAttack also attacks in
MEASURE_NORMS = (*NORMS, "l1")

#: the attacks of a robust-accuracy sweep (kdiga.attacks.sweep)
SWEEP_ATTACKS = ("pgd", "autoattack")
#: AutoAttack's versions (kdiga.attacks.autoattack; fra31/auto-attack's set_version)
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
#: the attacks a custom AutoAttack version may list
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
#: what each version other than custom runs (fra31/auto-attack's AutoAttack.set_version)
AUTOATTACK_VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}

#: batch augmentations of in-memory images (kdiga.data.augment)
AUGMENTATIONS = ("none", "crop", "crop_flip")
#: storage of a signal set's input gradients (kdiga.signals)
GRAD_DTYPES = ("float32", "float16", "bfloat16")
#: which cached view a sample gets in an epoch (kdiga.signals.SignalCache)
SCHEDULES = ("cycle", "random")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is as kdiga.data loads it with its defaults."""

    channels: int
    classes: int
    image_size: int  #: kdiga.data.load_dataset's default side
    test_images: int
    #: images of each class of the train split before the validation cut; None for an
    #: ImageFolder root, whose counts the shard stage reads
    train_class_counts: tuple[int, ...] | None = None
    #: the train split's images: the sum of train_class_counts when given, else (an
    #: ImageFolder root) ILSVRC-2012's, for estimates
    train_images: int = 0
    #: an ImageFolder root: written as shards of its image files and streamed while training
    #: (kdiga.stream); its sizes are known at the shard stage
    image_folder: bool = False

    def __post_init__(self) -> None:
        if self.train_class_counts is not None:
            object.__setattr__(self, "train_images", sum(self.train_class_counts))


#: the datasets kdiga.data loads. digits: its fixed split of the 1,797 images (a third to
#: test); synthetic: 512 images a split by default (``n``), labels ``arange(n) % classes``
DATASET_INFO = {
    "digits": DatasetInfo(
        channels=1,
        classes=10,
        image_size=16,
        test_images=599,
        train_class_counts=(119, 121, 118, 122, 121, 121, 121, 119, 116, 120),
    ),
    "cifar10": DatasetInfo(
        channels=3,
        classes=10,
        image_size=32,
        test_images=10_000,
        train_class_counts=(5_000,) * 10,
    ),
    "imagenet": DatasetInfo(
        channels=3,
        classes=1000,
        image_size=224,
        test_images=50_000,
        train_images=1_281_167,
        image_folder=True,
    ),
    "synthetic": DatasetInfo(
        channels=3,
        classes=10,
        image_size=32,
        test_images=512,
        train_class_counts=(52, 52, 51, 51, 51, 51, 51, 51, 51, 51),
    ),
}
DATASETS = tuple(DATASET_INFO)
