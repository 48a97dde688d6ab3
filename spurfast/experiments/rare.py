"""Rare spurious correlations (Yang et al., 2022): how few images teach a pattern, where it sits, what deletes it.

Per seed, per pattern and per ``n`` in ``ns``: the pattern is added to ``n`` training images of
the target class (labels unchanged; :func:`spurfast.rare.poison`, the images and R1-R3's noise
fixed by the seed), a fresh model (the seed's initialisation, the same for every ``n``) is
trained by ERM, and measured: the spurious score on the test images of other classes
(:func:`spurfast.rare.spurious_score`), the clean test accuracy, the accuracy on the poisoned
training images and the pattern's l2 norm on the test images. ``n = 0`` is the control: one
model per seed trained on clean data, scored with every pattern. Then, fixed before the run:

* **localization** (``localization_cases``, every seed): the units ranked by
  :func:`spurfast.rare.localize.pattern_units` on non-target training images, and what zeroing
  the top k does to the spurious score and the test accuracy against random units of the same
  layers (:func:`spurfast.rare.localize.zero_units_effect`);
* **deletion** (``deletion_cases``, every seed): incremental retraining, retraining from scratch
  without the poisoned images, and group influence (:mod:`spurfast.experiments.rare_deletion`).

* :class:`RareStudyConfig`, :func:`tiny_config`, :func:`load_data`, :func:`build_model`,
  :func:`run_rare_study`, :func:`estimate_seconds`, :func:`summarize`, :func:`markdown_tables`,
  :func:`write_csv`, :func:`as_studies`.

The options shared by ``benchmarks/rare_spurious.py`` and ``spurfast rare`` live in
:mod:`spurfast.experiments.rare_runner`; :func:`spurfast.report.rare.write_rare_run` writes the files.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from spurfast.attribution.scores import predict_logits, scoring_state
from spurfast.data._common import resolve_group_counts
from spurfast.experiments.rare_deletion import delete_poisoned, deletion_table, influence_deletion, summarize_deletion
from spurfast.models import MLP, SmallCNN
from spurfast.rare.localize import PATTERN_OBJECTIVES, pattern_units, zero_units_effect
from spurfast.rare.influence import hvp, lissa
from spurfast.rare.patterns import PATTERNS, pattern_l2, poison, spurious_score
from spurfast.train.erm import erm

__all__ = [
    "DATASETS", "MODELS", "RareStudyConfig", "tiny_config", "load_data", "build_model", "run_rare_study",
    "estimate_seconds", "summarize", "markdown_tables", "write_csv", "as_studies",
]

DATASETS = ("fashion", "synth")
MODELS = ("mlp", "small_cnn")
DEFAULT_TARGET = {"fashion": 0, "synth": 1}  # T-shirt/top; waterbird
DEFAULT_N_TRAIN = {"fashion": 10_000, "synth": 2000}
NUM_CLASSES = {"fashion": 10, "synth": 2}
#: Models each dataset runs when none is named (the README experiment).
DEFAULT_MODELS = {"fashion": ("mlp", "small_cnn"), "synth": ("small_cnn",)}
#: ERM epochs per (data, model), chosen with ``--estimate`` so that the README experiment fits an
#: hour on a 2-core CPU (the paper trains 70): one SmallCNN epoch on 10000 Fashion-MNIST images
#: costs about 3 s on one core, an MLP epoch 0.5 s, a SmallCNN epoch on 2000 synth images 0.7 s.
DEFAULT_EPOCHS = {("fashion", "mlp"): 20, ("fashion", "small_cnn"): 8, ("synth", "small_cnn"): 20,
                  ("synth", "mlp"): 20}
#: LiSSA recursion depth per model: the paper's 1000 for the MLP; 200 for SmallCNN, whose
#: minibatch Hessian-vector product costs ~0.12 s (1000 x 10 repeats would take hours).
DEFAULT_DEPTH = {"mlp": 1000, "small_cnn": 200}
RUN_KEYS = ("spurious_score", "test_acc", "poisoned_train_acc", "pattern_l2", "seconds")
CSV_FIELDS = ("data", "model", "kind", "pattern", "n", "seed", "spurious_score", "test_acc", "poisoned_train_acc",
              "pattern_l2", "epochs", "seconds")


def _ints(values, arg: str, minimum: int) -> Tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{arg} must be a non-empty sequence of ints >= {minimum}, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{arg} must be distinct, got {values!r}")
    return values


def _positive(value, arg: str, kind=int):
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) and value > 0
    if not ok or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{arg} must be a positive {kind.__name__}, got {value!r}")
    return value


@dataclasses.dataclass
class RareStudyConfig:
    """Settings of one study (one dataset, one model); ``None`` fields take the per-data defaults.

    Args:
        data: ``"fashion"`` (:class:`spurfast.data.FashionMNIST`, class-balanced subsets) or
            ``"synth"`` (:class:`spurfast.data.SynthWaterbirds`, 3x32x32, binary label).
        model: ``"mlp"`` (``hidden`` widths) or ``"small_cnn"`` (``width``).
        n_train, n_test: images (default 10000 / 2000 for fashion, 2000 / 2000 for synth).
        target_class: the class whose images get the pattern (default 0 T-shirt/top; synth 1).
        ns: numbers of poisoned images; 0 is the clean control. patterns: from :data:`PATTERNS`.
        seeds: per seed, the model's initialisation, the data order, the poisoned images and
            R1-R3's noise. data_seed: the subset of the data.
        epochs, lr, batch_size, optimizer: ERM (constant rate; epochs default per (data, model)).
        threshold: the spurious score's rise in ``p_target``.
        localization_cases: ``(pattern, n)`` pairs localized (default every pattern at ``max(ns)``);
            localize_images: non-target training images :func:`pattern_units` reads, with
            localize_objective (see :data:`~spurfast.rare.localize.PATTERN_OBJECTIVES`); ks,
            random_repeats: of :func:`zero_units_effect`.
        deletion_cases: ``(pattern, n)`` pairs deleted (default S3 at ``max(ns)``, R3 at 10 and at
            ``max(ns)``, those the study runs; else the last pattern at ``max(ns)``);
            deletion_epochs: incremental retraining (default ``epochs``, as the paper's 70 + 70).
        influence_damping, influence_scales, influence_depth, influence_repeats,
            influence_batch_size: group influence's LiSSA (the paper: damping 0.01, scale 25-100,
            depth 1000-2000, 10 repeats). LiSSA runs at the first scale above twice the estimated top
            Hessian eigenvalue (the next if it diverges; SmallCNN's is in the hundreds); depth
            defaults to 1000 (MLP) / 200 (SmallCNN) and repeats to 1, to fit the budget.

    Example:
        >>> cfg = RareStudyConfig("fashion", "small_cnn")
        >>> cfg.n_train, cfg.target_class, cfg.epochs, cfg.localization_cases, cfg.deletion_cases
        (10000, 0, 8, (('S1', 100), ('S3', 100), ('R3', 100)), (('S3', 100), ('R3', 10), ('R3', 100)))
    """

    data: str = "fashion"
    model: str = "mlp"
    n_train: Optional[int] = None
    n_test: int = 2000
    target_class: Optional[int] = None
    ns: Tuple[int, ...] = (0, 1, 3, 10, 30, 100)
    patterns: Tuple[str, ...] = ("S1", "S3", "R3")
    seeds: Tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    epochs: Optional[int] = None
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adam"
    hidden: Tuple[int, ...] = (512, 512)
    width: int = 16
    threshold: float = 0.1
    localization: bool = True
    localization_cases: Optional[Tuple[Tuple[str, int], ...]] = None
    localize_images: int = 1000
    localize_objective: str = "prob"
    ks: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    random_repeats: int = 5
    deletion: bool = True
    deletion_cases: Optional[Tuple[Tuple[str, int], ...]] = None
    deletion_epochs: Optional[int] = None
    influence_damping: float = 0.01
    influence_scales: Tuple[float, ...] = (25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0, 12800.0)
    influence_depth: Optional[int] = None
    influence_repeats: int = 1
    influence_batch_size: int = 128
    device: str = "cpu"

    def __post_init__(self):
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        self.ns = tuple(sorted(_ints(self.ns, "ns", 0)))
        self.seeds = _ints(self.seeds, "seeds", 0)
        self.patterns = tuple(self.patterns)
        bad = [p for p in self.patterns if p not in PATTERNS]
        if not self.patterns or bad or len(set(self.patterns)) != len(self.patterns):
            raise ValueError(f"patterns must be distinct names from {PATTERNS}, got {self.patterns!r}")
        self.n_train = DEFAULT_N_TRAIN[self.data] if self.n_train is None else self.n_train
        self.target_class = DEFAULT_TARGET[self.data] if self.target_class is None else self.target_class
        self.epochs = DEFAULT_EPOCHS[(self.data, self.model)] if self.epochs is None else self.epochs
        self.deletion_epochs = self.epochs if self.deletion_epochs is None else self.deletion_epochs
        self.influence_depth = DEFAULT_DEPTH[self.model] if self.influence_depth is None else self.influence_depth
        for arg in ("n_train", "n_test", "epochs", "batch_size", "width", "localize_images", "deletion_epochs",
                    "influence_depth", "influence_repeats", "influence_batch_size"):
            _positive(getattr(self, arg), arg)
        for arg in ("lr", "influence_damping"):
            _positive(getattr(self, arg), arg, float)
        if self.data == "fashion" and min(self.n_train, self.n_test) < 10:
            raise ValueError(f"n_train and n_test must be >= 10 for fashion (one image per class), got "
                             f"{self.n_train} and {self.n_test}")
        classes = NUM_CLASSES[self.data]
        target = self.target_class
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < classes:
            raise ValueError(f"target_class must lie in [0, {classes}) for {self.data}, got {self.target_class!r}")
        available = _class_count(self.data, self.n_train, self.target_class)
        if max(self.ns) > available:
            raise ValueError(f"ns: {max(self.ns)} poisoned images asked, but {self.n_train} {self.data} training "
                             f"images hold only {available} of class {self.target_class} (raise n_train)")
        if self.localize_objective not in PATTERN_OBJECTIVES:
            raise ValueError(f"localize_objective must be one of {PATTERN_OBJECTIVES}, got {self.localize_objective!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"threshold must be a number in [0, 1), got {self.threshold!r}")
        self.hidden = tuple(_positive(h, "hidden") for h in self.hidden)
        self.ks = tuple(sorted(_ints(self.ks, "ks", 1)))
        if isinstance(self.random_repeats, bool) or not isinstance(self.random_repeats, int) or self.random_repeats < 0:
            raise ValueError(f"random_repeats must be an int >= 0, got {self.random_repeats!r}")
        self.influence_scales = tuple(_positive(s, "influence_scales", float) for s in self.influence_scales)
        if not self.influence_scales:
            raise ValueError("influence_scales must not be empty")
        poisoned_ns = [n for n in self.ns if n > 0]
        top = max(poisoned_ns) if poisoned_ns else None
        if self.localization_cases is None:
            self.localization_cases = tuple((p, top) for p in self.patterns) if top else ()
        if self.deletion_cases is None:
            wanted = (("S3", top), ("R3", 10), ("R3", top))
            cases = [(p, n) for p, n in wanted if p in self.patterns and n in poisoned_ns]
            self.deletion_cases = tuple(dict.fromkeys(cases)) or (((self.patterns[-1], top),) if top else ())
        self.localization_cases = self._cases(self.localization_cases, "localization_cases")
        self.deletion_cases = self._cases(self.deletion_cases, "deletion_cases")

    def _cases(self, cases, arg: str) -> Tuple[Tuple[str, int], ...]:
        out = []
        for case in cases:
            try:
                pattern, n = case
            except (TypeError, ValueError):
                raise ValueError(f"{arg} must hold (pattern, n) pairs, got {case!r}") from None
            if pattern not in self.patterns or n not in self.ns or n == 0:
                raise ValueError(f"{arg}: {(pattern, n)!r} is not a poisoned run of the study "
                                 f"(patterns {self.patterns}, ns {self.ns})")
            out.append((pattern, n))
        return tuple(out)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _class_count(data: str, n_train: int, label: int) -> int:
    """Training images of class ``label`` in ``load_data``'s sets: balanced (fashion) or in
    Waterbirds' proportions (synth, groups ``2 * label + attr``)."""
    if data == "fashion":
        return n_train // 10 + (label < n_train % 10)
    counts = resolve_group_counts("train", max(n_train, 4), None)
    return counts[2 * label] + counts[2 * label + 1]


def tiny_config(cfg: RareStudyConfig) -> RareStudyConfig:
    """``cfg`` shrunk to a seconds-long plumbing run (one seed, one pattern, ``ns = (0, 3)``, one epoch).

    Example:
        >>> tiny = tiny_config(RareStudyConfig("synth", "small_cnn"))
        >>> tiny.ns, tiny.patterns, tiny.deletion_cases, tiny.influence_depth
        ((0, 3), ('S3',), (('S3', 3),), 3)
    """
    return dataclasses.replace(
        cfg, n_train=200, n_test=100, ns=(0, 3), patterns=("S3",), seeds=cfg.seeds[:1], epochs=1, hidden=(32,),
        width=4, localization_cases=None, localize_images=40, ks=(1, 2), random_repeats=1,
        deletion_cases=(("S3", 3),), deletion_epochs=1, influence_depth=3, influence_repeats=1,
        influence_batch_size=32,
    )


def load_data(cfg: RareStudyConfig):
    """``(train, test)`` of ``cfg.data`` (Fashion-MNIST needs ``apt-get install dataset-fashion-mnist``)."""
    if cfg.data == "fashion":
        from spurfast.data.fashion import FashionMNIST

        return (FashionMNIST("train", n=cfg.n_train, seed=cfg.data_seed),
                FashionMNIST("test", n=cfg.n_test, seed=cfg.data_seed))
    from spurfast.data.synth import SynthWaterbirds

    return (SynthWaterbirds("train", seed=cfg.data_seed, n=cfg.n_train),
            SynthWaterbirds("test", seed=cfg.data_seed, n=cfg.n_test))


def build_model(cfg: RareStudyConfig, image_shape: Sequence[int], num_classes: int, seed: int) -> nn.Module:
    """A fresh model of ``cfg.model`` from ``torch.manual_seed(seed)`` (the same for every ``n``)."""
    torch.manual_seed(seed)
    if cfg.model == "mlp":
        return MLP(in_features=math.prod(image_shape), hidden=cfg.hidden, num_classes=num_classes)
    model = SmallCNN(num_classes=num_classes, width=cfg.width, in_channels=image_shape[0])
    return model.to(memory_format=torch.channels_last)  # faster on CPU


class _Study:
    """The pieces every stage shares: data, model builder, trainer and the measures."""

    def __init__(self, cfg: RareStudyConfig, train, test, progress: bool):
        self.cfg, self.train_set, self.test, self.progress = cfg, train, test, progress
        self.image_shape = tuple(train.images.shape[1:])
        self.num_classes = int(train.num_classes)
        if not cfg.target_class < self.num_classes:
            raise ValueError(f"target_class must lie in [0, {self.num_classes}) for {cfg.data}, got {cfg.target_class}")
        available = int((train.labels == cfg.target_class).sum())
        if max(cfg.ns) > available:
            raise ValueError(f"ns: {max(cfg.ns)} poisoned images asked, but the training set has only {available} "
                             f"of class {cfg.target_class} (raise n_train)")
        others = (test.labels != cfg.target_class).nonzero()[:, 0]
        self.others = test.images[others]  # [M, C, H, W]: the images the spurious score reads
        pool = (train.labels != cfg.target_class).nonzero()[:, 0][: cfg.localize_images]
        self.localize_images, self.localize_labels = train.images[pool], train.labels[pool]

    def fresh(self, seed: int) -> nn.Module:
        return build_model(self.cfg, self.image_shape, self.num_classes, seed).to(self.cfg.device)

    def fit(self, model: nn.Module, data, epochs: int, seed: int) -> None:
        cfg = self.cfg
        erm(model, data, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, optimizer=cfg.optimizer,
            lr_schedule="constant", num_groups=data.num_groups, device=cfg.device, progress=self.progress)

    @torch.no_grad()
    def _acc(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        if images.shape[0] == 0:
            return 0.0
        with scoring_state(model):
            logits = predict_logits(model, images)  # [N, K] on CPU
        return int((logits.argmax(1) == labels).sum()) / images.shape[0]

    def measure(self, model: nn.Module, pattern: str, seed: int, poisoned=None) -> Dict[str, Any]:
        cfg = self.cfg
        out = {"spurious_score": spurious_score(model, self.test.images, self.test.labels, cfg.target_class, pattern,
                                                seed=seed, threshold=cfg.threshold),
               "test_acc": self._acc(model, self.test.images, self.test.labels), "poisoned_train_acc": None}
        if poisoned is not None and poisoned.n:
            idx = poisoned.poisoned_indices
            out["poisoned_train_acc"] = self._acc(model, poisoned.images[idx], poisoned.labels[idx])
        return out


def _localize(study: _Study, model: nn.Module, pattern: str, seed: int) -> Dict[str, Any]:
    cfg = study.cfg
    scores = pattern_units(model, study.localize_images, study.localize_labels, cfg.target_class, pattern, seed=seed,
                           objective=cfg.localize_objective)
    ranked = scores.extra["ranked"]
    ks = tuple(k for k in cfg.ks if k <= len(ranked))
    effect = zero_units_effect(model, scores, study.test.images, study.test.labels, cfg.target_class, pattern,
                               seed=seed, ks=ks, random_repeats=cfg.random_repeats, threshold=cfg.threshold,
                               random_seed=seed)
    top = max(ks)
    layers = {}
    for u in ranked[:top]:
        layers[u.layer] = layers.get(u.layer, 0) + 1
    top_units = [[u.layer, u.channel, round(s, 6)] for u, s in zip(ranked[:10], scores.extra["ranked_scores"])]
    return {"top_units": top_units, "top_k": top, "top_k_layers": layers, "n_images": scores.extra["n_images"],
            **effect}


def run_rare_study(cfg: RareStudyConfig, *, progress: bool = False,
                   log: Optional[Callable[[str], None]] = None, data=None) -> Dict[str, Any]:
    """The whole study of ``cfg``; returns a JSON-able dict (``data`` = ``(train, test)`` to skip loading).

    Keys: ``config``; ``data`` (dataset, sizes, target class, class names); ``runs`` (one row per
    (pattern, n, seed): ``kind`` ``"control"`` for n = 0, else ``"poisoned"``, and
    :data:`RUN_KEYS`; fractions in [0, 1], ``seconds`` the model's training time);
    ``summary`` (:func:`summarize`); ``localization`` (one record per case and seed: the ten
    ``top_units`` ``[layer, channel, score]``, ``top_k_layers`` (how many of the top ``top_k =
    max(ks)`` each layer holds), ``before`` and ``rows`` of :func:`zero_units_effect`);
    ``deletion`` (one record per case and seed: ``methods`` ``{poisoned, incremental, scratch,
    influence, control: measures}``); ``deletion_summary``; ``seconds``.
    """
    started = time.perf_counter()
    say = log or (lambda message: None)
    train, test = load_data(cfg) if data is None else data
    study = _Study(cfg, train, test, progress)
    l2 = {(p, s): pattern_l2(p, study.others, seed=s) for p in cfg.patterns for s in cfg.seeds}
    runs: List[Dict[str, Any]] = []
    localization: List[Dict[str, Any]] = []
    deletion: List[Dict[str, Any]] = []
    base = {"data": cfg.data, "model": cfg.model}
    with warnings.catch_warnings():
        # MLP's ReLU(inplace=True) makes NeuronStats recompute each output once: known and harmless here.
        warnings.filterwarnings("ignore", message=".*modified in place after its forward.*")
        for seed in cfg.seeds:
            control = None
            if 0 in cfg.ns:
                t0 = time.perf_counter()
                control = study.fresh(seed)
                study.fit(control, train, cfg.epochs, seed)
                seconds = time.perf_counter() - t0
                for pattern in cfg.patterns:
                    row = {**base, "kind": "control", "pattern": pattern, "n": 0, "seed": seed,
                           **study.measure(control, pattern, seed), "pattern_l2": l2[(pattern, seed)],
                           "epochs": cfg.epochs, "seconds": seconds}
                    runs.append(row)
                say(f"{cfg.data}/{cfg.model} seed {seed} control: scores "
                    + ", ".join(f"{r['pattern']} {r['spurious_score']:.3f}" for r in runs[-len(cfg.patterns):])
                    + f", test acc {runs[-1]['test_acc']:.3f} ({seconds:.0f} s)")
            for pattern in cfg.patterns:
                for n in (n for n in cfg.ns if n > 0):
                    t0 = time.perf_counter()
                    poisoned = poison(train, cfg.target_class, n, pattern, seed=seed)
                    model = study.fresh(seed)
                    study.fit(model, poisoned, cfg.epochs, seed)
                    seconds = time.perf_counter() - t0
                    row = {**base, "kind": "poisoned", "pattern": pattern, "n": n, "seed": seed,
                           **study.measure(model, pattern, seed, poisoned), "pattern_l2": l2[(pattern, seed)],
                           "epochs": cfg.epochs, "seconds": seconds}
                    runs.append(row)
                    say(f"{cfg.data}/{cfg.model} seed {seed} {pattern} n={n}: score {row['spurious_score']:.3f}, "
                        f"test acc {row['test_acc']:.3f}, poisoned train acc {row['poisoned_train_acc']:.2f} "
                        f"({seconds:.0f} s)")
                    if cfg.localization and (pattern, n) in cfg.localization_cases:
                        t0 = time.perf_counter()
                        record = {"pattern": pattern, "n": n, "seed": seed, **_localize(study, model, pattern, seed)}
                        record["seconds"] = time.perf_counter() - t0
                        localization.append(record)
                        last = record["rows"][-1]
                        say(f"  localization: top {last['k']} zeroed: score {record['before']['spurious_score']:.3f} "
                            f"-> {last['spurious_score']:.3f} (random {last['random_spurious_score']:.3f})")
                    if cfg.deletion and (pattern, n) in cfg.deletion_cases:
                        deletion.append(_delete(study, model, poisoned, row, control, pattern, n, seed, say))
    return {
        "config": cfg.to_dict(),
        "data": {"dataset": cfg.data, "n_train": len(train), "n_test": len(test), "num_classes": study.num_classes,
                 "image_shape": list(study.image_shape), "target_class": cfg.target_class,
                 "class_names": list(getattr(train, "label_names", [])) or None,
                 "target_train_count": int((train.labels == cfg.target_class).sum()),
                 "score_images": int(study.others.shape[0])},
        "runs": runs,
        "summary": summarize({"runs": runs}),
        "localization": localization,
        "deletion": deletion,
        "deletion_summary": summarize_deletion(deletion),
        "seconds": time.perf_counter() - started,
    }


def _delete(study: _Study, model, poisoned, row, control, pattern: str, n: int, seed: int, say) -> Dict[str, Any]:
    cfg = study.cfg
    t0 = time.perf_counter()
    methods = delete_poisoned(
        model, poisoned, seed=seed, make_model=lambda: study.fresh(seed),
        train=lambda m, data, epochs: study.fit(m, data, epochs, seed),
        measure=lambda m: study.measure(m, pattern, seed, poisoned), epochs=cfg.epochs,
        deletion_epochs=cfg.deletion_epochs, damping=cfg.influence_damping, scales=cfg.influence_scales,
        depth=cfg.influence_depth, repeats=cfg.influence_repeats, hvp_batch_size=cfg.influence_batch_size,
        device=cfg.device, log=say,
    )
    methods["poisoned"] = {k: row[k] for k in ("spurious_score", "test_acc", "poisoned_train_acc")}
    methods["control"] = None if control is None else study.measure(control, pattern, seed, poisoned)
    return {"pattern": pattern, "n": n, "seed": seed, "methods": methods, "seconds": time.perf_counter() - t0}


def _mean_std(values) -> Dict[str, Optional[float]]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(present), "std": statistics.pstdev(present)}


def summarize(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Per ``(pattern, n)``, in run order: mean and population std over seeds of :data:`RUN_KEYS`.

    Example:
        >>> runs = [{"pattern": "S3", "n": 10, "seed": s, "spurious_score": v, "test_acc": 0.8,
        ...          "poisoned_train_acc": 1.0, "pattern_l2": 2.0, "seconds": 1.0} for s, v in ((0, 0.2), (1, 0.4))]
        >>> row = summarize({"runs": runs})[0]
        >>> row["pattern"], row["n"], row["seeds"], round(row["spurious_score"]["mean"], 3)
        ('S3', 10, [0, 1], 0.3)
    """
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for r in results["runs"]:
        groups.setdefault((r["pattern"], r["n"]), []).append(r)
    return [{"pattern": p, "n": n, "seeds": [r["seed"] for r in rows],
             **{k: _mean_std([r.get(k) for r in rows]) for k in RUN_KEYS}} for (p, n), rows in groups.items()]


def _cell(s: Mapping[str, Optional[float]], digits: int = 3) -> str:
    return "-" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _title(results: Mapping[str, Any]) -> str:
    cfg = results["config"]
    arch = f"MLP {tuple(cfg['hidden'])}" if cfg["model"] == "mlp" else f"SmallCNN width {cfg['width']}"
    data = "Fashion-MNIST" if cfg["data"] == "fashion" else "SynthWaterbirds"
    d = results["data"]
    return (f"{data}, {arch}: {d['n_train']} training images ({d['target_train_count']} of target class "
            f"{cfg['target_class']}), {cfg['epochs']} epochs {cfg['optimizer']} lr {cfg['lr']} "
            f"batch {cfg['batch_size']}, "
            f"seeds {list(cfg['seeds'])}")


def markdown_tables(results: Mapping[str, Any]) -> str:
    """The spurious score against ``n`` (mean ± std over seeds, with each pattern's l2 norm and the
    test accuracy), the localization table and the deletion table of one study, as Markdown."""
    cfg = results["config"]
    summary = {(r["pattern"], r["n"]): r for r in summarize(results)}
    ns = list(cfg["ns"])
    lines = [f"#### {_title(results)}", "",
             "Spurious score (fraction of non-target test images whose target probability rises by more than "
             f"{cfg['threshold']} with the pattern), mean ± std over seeds:", "",
             "| pattern | l2 | " + " | ".join("n = 0 (control)" if n == 0 else f"n = {n}" for n in ns)
             + " | test acc (min-max over n) |", "|---|---|" + "---|" * len(ns) + "---|"]
    for p in cfg["patterns"]:
        cells = [_cell(summary[(p, n)]["spurious_score"]) if (p, n) in summary else "-" for n in ns]
        accs = [summary[(p, n)]["test_acc"]["mean"] for n in ns if (p, n) in summary]
        l2 = next(summary[(p, n)]["pattern_l2"]["mean"] for n in ns if (p, n) in summary)
        lines.append(f"| {p} | {l2:.2f} | " + " | ".join(cells) + f" | {min(accs):.3f}-{max(accs):.3f} |")
    if results.get("localization"):
        lines += ["", f"Localization (units ranked by pattern_units, objective {cfg['localize_objective']}, on "
                  "non-target training images; weight rows zeroed; "
                  "random: as many units of the same layers, mean over draws), mean over seeds:", "",
                  "| pattern | n | k | score, top k zeroed | score, random k | test acc, top k | test acc, random k |",
                  "|---|---|---|---|---|---|---|"]
        cases: Dict[tuple, List[Mapping[str, Any]]] = {}
        for rec in results["localization"]:
            cases.setdefault((rec["pattern"], rec["n"]), []).append(rec)
        for (p, n), recs in cases.items():
            before = [r["before"] for r in recs]
            lines.append(f"| {p} | {n} | 0 | {_cell(_mean_std([b['spurious_score'] for b in before]))} | | "
                         f"{_cell(_mean_std([b['clean_acc'] for b in before]))} | |")
            for i, row in enumerate(recs[0]["rows"]):
                rows = [r["rows"][i] for r in recs if len(r["rows"]) > i]
                lines.append(
                    f"| {p} | {n} | {row['k']} | {_cell(_mean_std([r['spurious_score'] for r in rows]))} | "
                    f"{_cell(_mean_std([r['random_spurious_score'] for r in rows]))} | "
                    f"{_cell(_mean_std([r['clean_acc'] for r in rows]))} | "
                    f"{_cell(_mean_std([r['random_clean_acc'] for r in rows]))} |")
    if results.get("deletion"):
        lines += ["", "Deletion of the poisoned images: spurious score, mean ± std over seeds:", "",
                  deletion_table(results["deletion"], deletion_epochs=cfg["deletion_epochs"], epochs=cfg["epochs"]),
                  "", f"Group influence: LiSSA damping {cfg['influence_damping']}, depth {cfg['influence_depth']}, "
                  f"{cfg['influence_repeats']} repeat(s), Hessian minibatch {cfg['influence_batch_size']}, the first "
                  f"scale of {list(cfg['influence_scales'])} above twice the estimated top eigenvalue (used: "
                  + ", ".join(sorted({str(r["methods"]["influence"].get("scale")) for r in results["deletion"]}))
                  + ")."]
    return "\n".join(lines)


def as_studies(results) -> List[Mapping[str, Any]]:
    """The studies in ``results``: one study, a list of studies or ``{"studies": [...]}``."""
    if isinstance(results, Mapping):
        return list(results["studies"]) if "studies" in results else [results]
    return list(results)


def write_csv(results, path: Union[str, Path]) -> Path:
    """One row per trained model's measurement: every run (control rows once per pattern, the same
    model) and every deletion method; columns :data:`CSV_FIELDS`. ``results``: a study, a list of
    studies or ``{"studies": [...]}``."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for study in as_studies(results):
            cfg = study["config"]
            for row in study["runs"]:
                writer.writerow(row)
            for rec in study.get("deletion", []):
                for method in ("incremental", "scratch", "influence"):
                    entry = rec["methods"][method]
                    writer.writerow({"data": cfg["data"], "model": cfg["model"], "kind": method,
                                     "pattern": rec["pattern"], "n": rec["n"], "seed": rec["seed"], **entry})
    return path


def estimate_seconds(cfg: RareStudyConfig, *, data=None) -> Dict[str, Any]:
    """Time one piece of every stage on ``cfg``'s data and extrapolate to the whole study.

    On the poisoned set of the last pattern at ``max(ns)``: one ERM epoch after a warm-up epoch,
    one measurement, one localization (:func:`pattern_units` plus :func:`zero_units_effect` at
    ``cfg``'s ks and repeats), one group influence of depth 8 (its fixed cost: the eigenvalue
    estimate, the gradient pass, the exact residual) and 10 LiSSA steps (the cost of a step).
    Then ``expected`` = models x epochs x epoch + measurements + localization cases + deletion
    cases x ((deletion_epochs + epochs) x epoch + influence). The model has
    trained two epochs, not ``epochs``: its Hessian, and so the scales LiSSA needs, may differ.
    """
    train, test = load_data(cfg) if data is None else data
    study = _Study(cfg, train, test, progress=False)
    seed, pattern = cfg.seeds[0], cfg.patterns[-1]
    poisoned = poison(train, cfg.target_class, max(cfg.ns), pattern, seed=seed)
    model = study.fresh(seed)
    study.fit(model, poisoned, 1, seed)  # warm-up: first-call costs (imports, allocator) are not per epoch
    t0 = time.perf_counter()
    study.fit(model, poisoned, 1, seed + 1)
    pieces = {"epoch": time.perf_counter() - t0}
    t0 = time.perf_counter()
    study.measure(model, pattern, seed, poisoned)
    pieces["measure"] = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*modified in place after its forward.*")
        if cfg.localization and cfg.localization_cases:
            t0 = time.perf_counter()
            _localize(study, model, pattern, seed)
            pieces["localization"] = time.perf_counter() - t0
        if cfg.deletion and cfg.deletion_cases:
            probe_depth = min(8, cfg.influence_depth)
            _, entry = influence_deletion(model, poisoned, seed=seed, damping=cfg.influence_damping,
                                          scales=cfg.influence_scales, depth=probe_depth, repeats=1,
                                          hvp_batch_size=cfg.influence_batch_size, device=cfg.device)
            weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            product = hvp(model, nn.functional.cross_entropy, poisoned, params=weights,
                          batch_size=cfg.influence_batch_size, seed=seed, device=cfg.device)
            t0 = time.perf_counter()  # ten LiSSA steps at a scale far too large to diverge
            lissa(product, [torch.randn_like(w) for w in weights], damping=cfg.influence_damping, scale=1e6, depth=10)
            pieces["influence_step"] = (time.perf_counter() - t0) / 10
            pieces["influence_fixed"] = max(entry["seconds"] - probe_depth * pieces["influence_step"], 0.0)
            pieces["influence_scales_tried"] = len(entry["scales_tried"])
    poisoned_ns = [n for n in cfg.ns if n > 0]
    models = len(cfg.seeds) * ((0 in cfg.ns) + len(cfg.patterns) * len(poisoned_ns))
    measures = len(cfg.seeds) * len(cfg.patterns) * len(cfg.ns)
    total = models * cfg.epochs * pieces["epoch"] + measures * pieces["measure"]
    if "localization" in pieces:
        total += len(cfg.seeds) * len(cfg.localization_cases) * pieces["localization"]
    if "influence_step" in pieces:
        per_case = ((cfg.deletion_epochs + cfg.epochs) * pieces["epoch"] + 4 * pieces["measure"]
                    + pieces["influence_fixed"]
                    + cfg.influence_depth * cfg.influence_repeats * pieces["influence_step"])
        total += len(cfg.seeds) * len(cfg.deletion_cases) * per_case
    return {"data": cfg.data, "model": cfg.model, "pieces_seconds": {k: round(v, 3) for k, v in pieces.items()},
            "trained_models": models, "expected_seconds": round(total, 1), "threads": torch.get_num_threads()}
