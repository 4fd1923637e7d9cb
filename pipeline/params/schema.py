"""The sections of ``params.yaml`` and their keys: each key declared once, as a field of a
frozen dataclass, with its check, its default and a one-line description (:func:`key`).
:class:`Study` is the whole file; :func:`describe` lists every key."""

# key(), section() and entries() return dataclass fields: ruff's extend-immutable-calls in
# pyproject.toml names them by their former path, pipeline.params.key, ...

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from kdiga.bounds.settings import AscentSettings
from kdiga.loss_config import IGA_REDUCTIONS, STUDENT_GRAD_MODES
from kdiga.methods import TEACHER_METHODS
from kdiga.options import (
    AUGMENTATIONS,
    AUTOATTACK_ATTACKS,
    AUTOATTACK_VERSIONS,
    DATASET_INFO,
    DATASETS,
    GRAD_DTYPES,
    NORMS,
    SCHEDULES,
    SWEEP_ATTACKS,
    DatasetInfo,
)
from pipeline.params.fields import (
    _REQUIRED,
    MAX_BATCH,
    MAX_CLASSES,
    MAX_GPUS,
    MAX_IMAGE_SIZE,
    MAX_RESTARTS,
    MAX_STEPS,
    MAX_VIEWS,
    SEED_MAX,
    ParamError,
    _arch,
    _epochs,
    _float,
    _fraction,
    _methods,
    _milestones,
    _model_kwargs,
    _momentum,
    _norm_stats,
    _plain,
    _radii,
    _seeds,
    _sha256,
    _student_init,
    _teacher_source,
    _text,
    _val_fraction,
    choice,
    entries,
    flag,
    integer,
    key,
    listing,
    number,
    optional,
    parse_radius,
    section,
)

# -- sections --------------------------------------------------------------------------------

#: the optimiser settings a student may override (the paper fine-tunes ViT-S at lr 1e-5)
OPTIMISER_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones")
#: every training setting shared by a teacher's training and the students'
TRAIN_KEYS = (*OPTIMISER_KEYS, "augment", "crop_padding")


@dataclass(frozen=True, kw_only=True)
class Shard:
    dataset: str = key(
        "digits", choice(*DATASETS), "the dataset: digits, cifar10, imagenet, synthetic"
    )
    root: str | None = key(
        None, optional(_text), "dataset root (cifar10: torchvision layout; imagenet: ImageFolder)"
    )
    image_size: int = key(16, integer(4, MAX_IMAGE_SIZE), "images are resized to this side")
    val_fraction: float = key(
        0.2, _val_fraction, "held out of train for tuning; the test split is never used to tune"
    )
    test_samples: int | None = key(
        300, optional(integer(1)), "evaluate on this many random test images (null: all)"
    )
    max_per_shard: int = key(10000, integer(1), "images per WebDataset shard")
    num_classes: int | None = key(
        None,
        optional(integer(2, MAX_CLASSES)),
        "null: the dataset's "
        "own (imagenet 1000); an ImageFolder root with another number "
        "of class folders sets it",
    )
    resize_short: int | None = key(
        None,
        optional(integer(1, MAX_IMAGE_SIZE)),
        "imagenet: store "
        "images whose short side is longer shrunk to this side "
        "(null: the original JPEG bytes)",
    )
    workers: int = key(
        2,
        integer(0, 256),
        "imagenet: DataLoader workers that decode and "
        "augment streamed shards (the batch order depends on it)",
    )
    shuffle_buffer: int = key(
        1000,
        integer(0, 10_000_000),
        "imagenet: samples in each worker's shuffle buffer while training",
    )
    max_gb: float = key(
        16.0,
        number(strict=True),
        "the shard stage refuses data whose images "
        "held in memory would be larger (GB: images x channels x image_size^2 "
        "bytes; every stage holds them)",
        results=False,
    )
    seed: int = key(
        0,
        integer(0, SEED_MAX),
        "draws the validation split, the test subset, the "
        "attacks' random starts and the bounds' samples (the same for every model)",
    )

    def check(self, prefix: str) -> None:
        if self.dataset in ("cifar10", "imagenet") and self.root is None:
            raise ParamError(
                f"{prefix}.root", None, f"dataset {self.dataset} needs the path to its local root"
            )
        if self.num_classes is not None and self.dataset != "imagenet":
            raise ParamError(
                f"{prefix}.num_classes",
                self.num_classes,
                f"only an imagenet (ImageFolder) root may set its number of classes; "
                f"{self.dataset} has {self.info.classes}: use null",
            )

    @property
    def streamed(self) -> bool:
        """The training split streams from shards of image files (ImageNet, any ImageFolder)."""
        return self.info.image_folder

    @property
    def info(self) -> DatasetInfo:
        """The dataset's facts (kdiga.options.DATASET_INFO): channels, classes, sizes."""
        return DATASET_INFO[self.dataset]

    @property
    def classes(self) -> int:
        """The number of classes: ``num_classes``, or the dataset's own."""
        return self.num_classes or self.info.classes


@dataclass(frozen=True, kw_only=True)
class Training:
    """The training settings a teacher's training and the students' share (TRAIN_KEYS)."""

    epochs: int = key(15, _epochs, "training epochs")
    batch_size: int = key(64, integer(1, MAX_BATCH), "training batch size")
    lr: float = key(0.05, number(strict=True), "SGD learning rate")
    momentum: float = key(0.9, _momentum, "SGD momentum, in [0, 1)")
    weight_decay: float = key(5.0e-4, number(), "SGD weight decay")
    milestones: list = key([10], _milestones, "epochs at which the lr is divided by 10")
    augment: str = key(
        "crop",
        choice(*AUGMENTATIONS),
        "none, crop or crop_flip (in-memory data; "
        "streamed imagenet trains on RandomResizedCrop + flip)",
    )
    crop_padding: int = key(2, integer(0), "pixels of padding of the random crop")
    # not in TRAIN_KEYS nor in any params view: the weights do not depend on it
    checkpoint_every: int = key(
        0,
        integer(0, MAX_STEPS),
        "also checkpoint every that many "
        "steps within an epoch, to resume mid-epoch (0: at the end of "
        "each epoch only); results do not depend on it",
        results=False,
    )


@dataclass(frozen=True, kw_only=True)
class TeacherTrain(Training):
    method: str = key("at", choice(*TEACHER_METHODS), "at (PGD-AT) or trades")
    seed: int = key(0, integer(0, SEED_MAX), "the teacher's training seed")
    eps: float = key(0.1, parse_radius, "the training attack's radius ([0, 1] pixels)")
    steps: int = key(3, integer(1, MAX_STEPS), "PGD steps of the training attack")
    step_size: float | None = key(None, optional(parse_radius), "null: 2.5 * eps / steps")
    trades_beta: float = key(6.0, number(), "TRADES' beta")


@dataclass(frozen=True, kw_only=True)
class Teacher:
    source: str = key(
        "train", _teacher_source, "train | file:<path> | url:<https://...> | timm:<name>"
    )
    arch: str | None = key(None, optional(_arch), "architecture (required unless timm:)")
    arch_kwargs: dict = key({}, lambda k, v: _model_kwargs(k, v), "architecture options")
    sha256: str | None = key(None, _sha256, "required for url:, checked for file:")
    mean: list | None = key(
        None,
        lambda k, v: _norm_stats(k, v),
        "input normalisation inside the model (null: identity or the checkpoint's own)",
    )
    std: list | None = key(None, lambda k, v: _norm_stats(k, v, positive=True), "see mean")
    max_mb: float = key(
        2048.0,
        number(strict=True),
        "url: a download larger than this (MB) stops, and nothing is kept",
        results=False,
    )
    train: TeacherTrain = section(TeacherTrain, "how a `train` teacher is trained")

    def check(self, prefix: str) -> None:
        if self.source == "train" and self.sha256 is not None:
            raise ParamError(
                f"{prefix}.sha256",
                self.sha256,
                "a sha256 checks a teacher's file: a train teacher reads none; use sha256: null",
            )
        if self.source.startswith("url:") and self.sha256 is None:
            raise ParamError(f"{prefix}.sha256", None, "a url: teacher needs its expected sha256")
        if (self.source == "train" or self.source.startswith(("file:", "url:"))) and (
            self.arch is None
        ):
            raise ParamError(
                f"{prefix}.arch", None, f"a {self.source.split(':')[0]} teacher needs its arch"
            )

    @property
    def kind(self) -> str:
        """How the report names it: PGD-AT, TRADES, or the source's scheme."""
        if self.source == "train":
            return {"at": "PGD-AT", "trades": "TRADES"}[self.train.method]
        return self.source.split(":", 1)[0]


@dataclass(frozen=True, kw_only=True)
class Student:
    arch: str = key(
        check=_arch, doc="architecture: a kdiga model, timm:<name> or torchvision:<name>"
    )
    init: str = key(
        "scratch",
        _student_init,
        "scratch | pretrained (timm or torchvision weights) | file:<checkpoint>",
    )
    sha256: str | None = key(None, _sha256, "checked for a file: init")
    kwargs: dict = key({}, lambda k, v: _model_kwargs(k, v), "architecture options")
    epochs: int | None = key(None, optional(_epochs), "null: distill.epochs")
    batch_size: int | None = key(None, optional(integer(1, MAX_BATCH)), "null: distill's")
    lr: float | None = key(
        None,
        optional(number(strict=True)),
        "null: distill.lr (the paper fine-tunes ViT-S/16 at 1e-5)",
    )
    momentum: float | None = key(None, optional(_momentum), "null: distill.momentum")
    weight_decay: float | None = key(None, optional(number()), "null: distill.weight_decay")
    milestones: list | None = key(None, optional(_milestones), "null: distill.milestones")

    def check(self, prefix: str) -> None:
        if self.sha256 is not None and not self.init.startswith("file:"):
            raise ParamError(
                f"{prefix}.sha256",
                self.sha256,
                f"a sha256 checks an init file: {prefix}.init is {self.init}, which reads no "
                "file; use init: file:<path>, or sha256: null",
            )
        if self.init == "pretrained" and not self.arch.startswith(("timm:", "torchvision:")):
            raise ParamError(
                f"{prefix}.init",
                self.init,
                f"pretrained weights come from timm or torchvision: arch {self.arch!r} has "
                "none; use a timm:<name> or torchvision:<name> arch, or init file:<checkpoint>",
            )


@dataclass(frozen=True, kw_only=True)
class Iga:
    weight: float = key(1.0, number(), "lambda_IGA")
    reduction: str = key(
        "per_sample_mean",
        choice(*IGA_REDUCTIONS),
        "per_sample_mean | batch_frobenius (the authors' code)",
    )
    grad_mode: str = key(
        "train",
        choice(*STUDENT_GRAD_MODES),
        "the student's BatchNorm mode for its input gradient: train (the authors' code) | eval",
    )


@dataclass(frozen=True, kw_only=True)
class Adversarial:
    eps: float = key(
        0.1,
        parse_radius,
        "radius of the inner maximisation (ard, kdiga_ardc, kdiga_arda, rslad, adaad, iad, igdm)",
    )
    steps: int = key(3, integer(1, MAX_STEPS), "its PGD steps")
    step_size: float | None = key(None, optional(parse_radius), "null: 2.5 * eps / steps")


@dataclass(frozen=True, kw_only=True)
class Rslad:
    adv_weight: float = key(
        5 / 6,
        _fraction,
        "alpha: the weight of KL(T(x) || S(x+delta)); "
        "1 - alpha weighs KL(T(x) || S(x)) (Zi et al. 2021: 5/6)",
    )


def _epoch_fraction(k: str, v: Any) -> float:
    f = _float(k, v)
    if f > 1:
        raise ParamError(k, v, "expected a fraction of the epochs in [0, 1]")
    return f


@dataclass(frozen=True, kw_only=True)
class Adaad:
    alpha: float = key(
        1.0,
        _fraction,
        "weight of KL(T(x+delta) || S(x+delta)); 1 - alpha "
        "weighs KL(T(x) || S(x)) (Huang et al. 2023: 1)",
    )


@dataclass(frozen=True, kw_only=True)
class Iad:
    alpha: float = key(
        1.0,
        _fraction,
        "weight of the distillation terms; 1 - alpha weighs CE(S(x), y) (Zhu et al. 2022: 1)",
    )
    beta: float = key(
        0.1, number(), "the teacher's reliability at x+delta is P_T(y | x+delta) ** beta (0.1)"
    )
    warmup: float = key(
        0.3,
        _epoch_fraction,
        "fraction of the epochs trained as ARD before "
        "the introspection term (0.3: epoch 60 of 200)",
    )
    weight_teacher: bool = key(
        False,
        flag,
        "true: the reliability also weighs the teacher's "
        "KL (their IAD-II); false: full weight (their IAD-I)",
    )


@dataclass(frozen=True, kw_only=True)
class Igdm:
    weight: float = key(
        1.0,
        number(),
        "gamma: the IGDM term's weight at the last epoch, "
        "gamma * epoch / epochs before (Lee et al. 2024: 1)",
    )


@dataclass(frozen=True, kw_only=True)
class Distill(Training):
    methods: list = key(check=_methods, doc="distillation methods (kdiga.methods.METHODS)")
    ce_weight: float = key(0.5, number(), "lambda_CE of KD's loss")
    kl_weight: float = key(0.5, number(), "lambda_KL of KD's loss")
    temperature: float = key(1.0, number(strict=True), "KD temperature")
    iga: Iga = section(Iga, "the input gradient alignment term (kdiga, kdiga_ardc, kdiga_arda)")
    adversarial: Adversarial = section(Adversarial, "the inner maximisation")
    rslad: Rslad = section(Rslad, "RSLAD's loss weights")
    adaad: Adaad = section(Adaad, "AdaAD's loss weights")
    iad: Iad = section(Iad, "IAD's loss weights and warm-up")
    igdm: Igdm = section(Igdm, "IGDM's weight and its ramp")
    compile_teacher: bool = key(
        False,
        flag,
        "the teacher's forward and input gradient "
        "through torch.compile (CUDA only; a compile of tens of "
        "seconds per job against a saving per step)",
    )
    gpus_per_job: int = key(
        1,
        integer(1, MAX_GPUS),
        "GPUs that train one student together: "
        "> 1 runs it as one torchrun/DDP job holding that many devices "
        "(the global batch is split between them)",
    )


@dataclass(frozen=True, kw_only=True)
class Signals:
    enabled: bool = key(
        False,
        flag,
        "true: students of cacheable methods train from the "
        "teacher's cached logits and input gradients",
    )
    views: int = key(
        16, integer(1, MAX_VIEWS), "K augmented views per image (view 0 is the image itself)"
    )
    grad_dtype: str = key("float16", choice(*GRAD_DTYPES), "storage of the input gradients")
    schedule: str = key("cycle", choice(*SCHEDULES), "cycle: each view once per K epochs | random")
    batch_size: int = key(256, integer(1, MAX_BATCH), "images per teacher call")
    max_gb: float = key(
        20.0,
        number(strict=True),
        "the stage refuses to compute a signals file "
        "larger than this (GB: views x images x C x H x W x bytes, plus "
        "logits)",
        results=False,
    )


@dataclass(frozen=True, kw_only=True)
class Pgd:
    steps: int = key(20, integer(1, MAX_STEPS), "PGD steps")
    restarts: int = key(1, integer(1, MAX_RESTARTS), "random restarts")
    step_size: float | None = key(None, optional(parse_radius), "null: 2.5 * radius / steps")


def _aa_targets(k: str, v: Any) -> int | None:
    return optional(integer(1, max(d.classes for d in DATASET_INFO.values()) - 1))(k, v)


@dataclass(frozen=True, kw_only=True)
class AutoAttackSettings:
    version: str = key("custom", choice(*AUTOATTACK_VERSIONS), "standard | plus | rand | custom")
    attacks: list = key(
        ["apgd-ce", "apgd-dlr"],
        listing(choice(*AUTOATTACK_ATTACKS)),
        "the attacks of the custom version",
    )
    n_restarts: int | None = key(
        1, optional(integer(1, MAX_RESTARTS)), "APGD-CE / FAB restarts (null: AutoAttack's default)"
    )
    n_iter: int | None = key(
        25, optional(integer(1, MAX_STEPS)), "APGD / FAB iterations (null: 100)"
    )
    n_target_classes: int | None = key(
        None, _aa_targets, "APGD-T / FAB-T targets (null: 9, or classes - 1)"
    )


@dataclass(frozen=True, kw_only=True)
class Attack:
    split: str = key("test", choice("test", "val"), "test | val (tune on val)")
    attacks: list = key(["pgd", "autoattack"], listing(choice(*SWEEP_ATTACKS)), "pgd, autoattack")
    radii: list = key(
        [0.02, 0.05, 0.1, 0.15, 0.2],
        _radii,
        'increasing radii in [0, 1] pixel units (write 8/255 as "8/255")',
    )
    norm: str = key("linf", choice(*NORMS), "linf | l2")
    batch_size: int = key(500, integer(1, MAX_BATCH), "images per attack batch")
    compile: bool = key(False, flag, "PGD's steps through torch.compile (CUDA only)")
    pgd: Pgd = section(Pgd, "PGD-k")
    autoattack: AutoAttackSettings = section(AutoAttackSettings, "AutoAttack")


_ASCENT = AscentSettings()  # the bounds' ascent defaults are the library's


@dataclass(frozen=True, kw_only=True)
class Bounds:
    radii: list = key([0.05, 0.1], listing(parse_radius), "radii of the LLM (Table 4)")
    samples: int = key(1000, integer(1), "random test samples (the paper: 1000)")
    steps: int = key(
        _ASCENT.steps,
        integer(0, MAX_STEPS),
        "ascent steps of each run of the LLM maximisation, at most",
    )
    restarts: int = key(
        _ASCENT.restarts,
        integer(1, MAX_RESTARTS),
        "its runs: from the FGSM corner, the opposite corner, then random points",
    )
    tol: float = key(
        _ASCENT.tol,
        number(),
        "a sample stops when its relative gain over `patience` steps is below this",
    )
    patience: int = key(
        _ASCENT.patience, integer(1, MAX_STEPS), "steps over which the gain is measured"
    )
    check_samples: int = key(
        200,
        integer(0),
        "samples on which Proposition 2 is tested at PGD, random and ascent points (0: not tested)",
    )
    batch_size: int = key(500, integer(1, MAX_BATCH), "images per batch")


@dataclass(frozen=True, kw_only=True)
class Report:
    figure_attack: str = key("pgd", choice(*SWEEP_ATTACKS), "the attack drawn in the figure")
    claim_radius: float | None = key(
        None,
        optional(parse_radius),
        "the radius at which the "
        "claims table compares robust accuracy (null: the attack "
        "radius nearest distill.adversarial.eps)",
    )


@dataclass(frozen=True, kw_only=True)
class Study:
    seeds: list = key([0], _seeds, "each (teacher, method, student) is trained once per seed")
    shard: Shard = section(Shard, "data -> WebDataset shards")
    teachers: dict = entries(Teacher, "named teachers")
    students: dict = entries(Student, "named students")
    distill: Distill = section(Distill, "distillation: methods and training settings")
    signals: Signals = section(Signals, "teacher signals paid once per teacher (optional)")
    attack: Attack = section(Attack, "attack evaluation of every model")
    bounds: Bounds = section(Bounds, "local-linearity bound terms of every student (Table 4)")
    report: Report = section(Report, "the report")
    raw: dict = field(default_factory=dict, repr=False, compare=False, init=False)
    #: settings that are allowed but change less than they seem (:func:`param_warnings`)
    warnings: tuple = field(default=(), repr=False, compare=False, init=False)

    @functools.cached_property
    def seed_set(self) -> frozenset[int]:
        """``seeds`` as a set, for lookups."""
        return frozenset(self.seeds)

    # -- typed access ----------------------------------------------------------------------

    def value(self, dotted: str) -> Any:
        """The validated value at a dotted key (``distill.iga``, ``teachers.pgdat``), as
        plain JSON-able data."""
        node: Any = self
        for part in dotted.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        return _plain(node)

    def train_settings(self, student: str) -> dict:
        """The training settings of ``student``: distill's, with the student's overrides."""
        s, d = self.students[student], self.distill
        out = {k: getattr(d, k) for k in TRAIN_KEYS}
        out |= {k: getattr(s, k) for k in OPTIMISER_KEYS if getattr(s, k) is not None}
        return out | {"checkpoint_every": d.checkpoint_every}

    @property
    def data(self) -> dict:
        """num_classes, in_chans and image_size the models are built for."""
        return {
            "num_classes": self.shard.classes,
            "in_chans": self.shard.info.channels,
            "image_size": self.shard.image_size,
        }


def describe(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) of every key, in declaration order: the reference of
    ``params.yaml`` (``python -m pipeline.params --describe``)."""
    cls = cls or Study
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        doc = f.metadata.get("doc", "")
        if "section" in f.metadata:
            rows.append((dotted, "", doc))
            rows += describe(f.metadata["section"], dotted)
        elif "entries" in f.metadata:
            rows.append((f"{dotted}.<name>", "", doc))
            rows += describe(f.metadata["entries"], f"{dotted}.<name>")
        else:
            if f.default is not _REQUIRED:
                default = f.default
            elif f.default_factory is not _REQUIRED:
                default = f.default_factory()
            else:
                default = "(required)"
            rows.append((dotted, json_text(default), doc))
    return rows


def json_text(v: Any) -> str:
    return v if v == "(required)" else json.dumps(v)
