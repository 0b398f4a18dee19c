"""Zero-shot learning on pre-extracted features: Xian et al.'s xlsa17 release as it unpacks.

xlsa17 ("Zero-Shot Learning — The Good, the Bad and the Ugly", Xian et al. 2017/2018) ships one folder per dataset:

    <root>/<DATASET>/res101.mat       features (2048, N): ResNet-101 features, one COLUMN per image
                                      labels (N, 1): 1-based class ids, rows of att's columns
    <root>/<DATASET>/att_splits.mat   att (A, C): one attribute COLUMN per class (original_att unnormalised)
                                      trainval_loc, test_seen_loc, test_unseen_loc: 1-based rows of res101
                                      (the "proposed splits", PS); allclasses_names (C, 1), optional

``read_xlsa17`` reads the pair into zero-based, row-major arrays and checks what the files promise: every key present,
features and labels of one length, every location inside res101, a row of att for every label. A bad file fails
naming the file and the key.

``ZSLFeatureDataModule`` L2-normalises as the official Bi-VAEGAN scripts do (``--L2_norm``, set in every one of
them): each feature row to ``radius`` (5 for AWA2, 1 elsewhere) and each attribute row to 1. It exposes, for the
model (``setup`` reads them from ``trainer.datamodule``; models never import data modules):

* ``attributes`` (C, A), ``seen_classes`` / ``unseen_classes`` (the label ids of trainval / test_unseen);
* ``train_features`` / ``train_labels``: the labelled seen trainval set;
* ``unseen_features``: the **unlabelled** test_unseen features, the transductive set (its labels are not exposed
  here; only their class histogram, ``unseen_class_counts``, is: the "known prior" of the official protocol);
* evaluation loaders of ``(feature, label, index)``: loader 0 test_unseen, loader 1 test_seen.

A training "batch" is only an iteration number: GAN models draw their own random batches from the tensors above,
``critic_iter`` of them per step, as the official loop does (``train_dataloader`` serves ``ceil(n_trainval /
batch_size)`` iterations per epoch, sharded across DDP ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.base import ZooDataModule, require_path
from datamodules.sampler import RandomBatchSampler

__all__ = ["XLSA17", "read_xlsa17", "l2_normalize", "FeatureDataset", "ZSLFeatureDataModule", "DigitsZSLDataModule",
           "XLSA17_LAYOUT"]

XLSA17_LAYOUT = """\
<root>/<DATASET>/res101.mat       features (2048, N), labels (N, 1), 1-based
<root>/<DATASET>/att_splits.mat   att (A, C), trainval_loc, test_seen_loc, test_unseen_loc (1-based)
with <DATASET> one of AWA2, AWA1, CUB, SUN, FLO (the folder names of the release)"""
XLSA17_SOURCE = ("the xlsa17 archive of Xian et al. (http://datasets.d2.mpi-inf.mpg.de/xian/xlsa17.zip), unzipped "
                 "so that <root> is its data/ folder")


@dataclass
class XLSA17:
    """One dataset of the xlsa17 release, zero-based and row-major (features ``(N, d)``, attributes ``(C, A)``)."""

    features: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    trainval_loc: np.ndarray
    test_seen_loc: np.ndarray
    test_unseen_loc: np.ndarray
    class_names: list[str] = field(default_factory=list)


def _load_mat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat  # noqa: PLC0415  (scipy comes with scikit-learn)

    try:
        return loadmat(str(path))
    except Exception as error:  # scipy raises ValueError, TypeError, MatReadError... for a damaged file
        raise ValueError(f"cannot read '{path}' as a MATLAB .mat file: {error}") from error


def _key(mat: dict[str, Any], key: str, path: Path) -> np.ndarray:
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"'{path}' has no key '{key}' (it has {keys}); is it the xlsa17 file of that name?")
    return np.asarray(mat[key])


def _locations(mat: dict[str, Any], key: str, path: Path, num_rows: int) -> np.ndarray:
    loc = _key(mat, key, path).astype(np.int64).reshape(-1)
    if loc.size == 0:
        raise ValueError(f"'{path}': '{key}' is empty")
    bad = loc[(loc < 1) | (loc > num_rows)]
    if bad.size:
        raise ValueError(f"'{path}': '{key}' holds locations {bad[:5].tolist()} outside 1..{num_rows} (the rows of "
                         "res101.mat; xlsa17 locations are 1-based)")
    return loc - 1


def read_xlsa17(folder: str | Path) -> XLSA17:
    """Read ``folder/res101.mat`` and ``folder/att_splits.mat`` (one dataset of the release).

    Raises:
        DatasetNotFoundError: a file is missing (the message shows the layout and where to get it).
        ValueError: a file is unreadable, lacks a key, or disagrees with the other (naming the file and key).
    """
    folder = Path(folder)
    res_path = require_path(folder / "res101.mat", "xlsa17 features", XLSA17_LAYOUT, XLSA17_SOURCE)
    att_path = require_path(folder / "att_splits.mat", "xlsa17 attributes and splits", XLSA17_LAYOUT, XLSA17_SOURCE)
    res, att_mat = _load_mat(res_path), _load_mat(att_path)

    features = _key(res, "features", res_path)
    labels = _key(res, "labels", res_path).reshape(-1)
    if features.ndim != 2:
        raise ValueError(f"'{res_path}': 'features' must be a 2-D (dim, N) array, got shape {features.shape}")
    if features.shape[1] != labels.size:
        raise ValueError(f"'{res_path}': 'features' has {features.shape[1]} columns (images) but 'labels' has "
                         f"{labels.size} entries; features are stored (dim, N) in xlsa17")
    attributes = _key(att_mat, "att", att_path)
    if attributes.ndim != 2:
        raise ValueError(f"'{att_path}': 'att' must be a 2-D (A, C) array, got shape {attributes.shape}")
    num_classes = attributes.shape[1]
    labels = labels.astype(np.int64)
    bad = np.unique(labels[(labels < 1) | (labels > num_classes)])
    if bad.size:
        raise ValueError(f"'{res_path}': 'labels' holds classes {bad[:5].tolist()} with no attribute row: "
                         f"'{att_path}' 'att' has {num_classes} class columns (labels are 1-based)")
    num_rows = labels.size
    names: list[str] = []
    if "allclasses_names" in att_mat:
        names = [str(np.asarray(n).reshape(-1)[0]) if np.asarray(n).size else "" for n in
                 np.asarray(att_mat["allclasses_names"]).reshape(-1)]
    return XLSA17(
        features=np.ascontiguousarray(features.T, dtype=np.float32), labels=labels - 1,
        attributes=np.ascontiguousarray(attributes.T, dtype=np.float32),
        trainval_loc=_locations(att_mat, "trainval_loc", att_path, num_rows),
        test_seen_loc=_locations(att_mat, "test_seen_loc", att_path, num_rows),
        test_unseen_loc=_locations(att_mat, "test_unseen_loc", att_path, num_rows), class_names=names)


def l2_normalize(x: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Rows of ``x`` scaled to norm ``radius`` (the official ``--L2_norm``; zero rows stay zero)."""
    return F.normalize(x, p=2, dim=-1) * radius


class FeatureDataset(Dataset):
    """``(feature, label, index)`` items of one evaluation split."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[i], self.labels[i], i


class _Iterations(Dataset):
    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        return i


class ZSLFeatureDataModule(ZooDataModule):
    """One xlsa17 dataset, L2-normalised, for transductive and inductive zero-shot models (see the module docstring).

    Args:
        root: the release's ``data`` folder (holding ``<dataset>/res101.mat``).
        dataset: the folder name: ``AWA2``, ``AWA1``, ``CUB``, ``SUN``, ``FLO``.
        l2_norm: normalise features to ``radius`` and attributes to 1 (every official script does).
        radius: the feature norm (official: 5 for AWA2, 1 for the others).
        batch_size: the batch the model draws per critic/generator step; also sets the iterations per epoch,
            ``ceil(n_trainval / batch_size)``, as the official loop counts them.
        unseen_prior: subsample test_unseen so that its classes (in ``unseen_classes`` order) follow these proportions,
            keeping as many images as possible (the skewed-prior experiment); ``None`` keeps the split as released.
        prior_seed: the seed of that subsampling.
    """

    def __init__(self, root: str = "data/xlsa17", dataset: str = "CUB", *, l2_norm: bool = True, radius: float = 1.0,
                 batch_size: int = 64, unseen_prior: Optional[Sequence[float]] = None, prior_seed: int = 0,
                 eval_batch_size: Optional[int] = 1024, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        self.root, self.dataset = root, dataset
        self.l2_norm, self.radius = l2_norm, float(radius)
        self.unseen_prior = None if unseen_prior is None else [float(p) for p in unseen_prior]
        self.prior_seed = prior_seed
        self._loaded = False

    def dataset_folder(self) -> Path:
        """The folder holding this dataset's two ``.mat`` files."""
        return Path(self.root).expanduser() / self.dataset

    def setup(self, stage: Optional[str] = None) -> None:
        if self._loaded:
            return
        data = read_xlsa17(self.dataset_folder())
        features = torch.from_numpy(data.features)
        attributes = torch.from_numpy(data.attributes)
        if self.l2_norm:
            features, attributes = l2_normalize(features, self.radius), l2_normalize(attributes, 1.0)
        labels = torch.from_numpy(data.labels)
        trainval, test_seen, test_unseen = (torch.from_numpy(a) for a in
                                            (data.trainval_loc, data.test_seen_loc, data.test_unseen_loc))
        self.seen_classes = labels[trainval].unique()
        self.unseen_classes = labels[test_unseen].unique()
        overlap = set(self.seen_classes.tolist()) & set(self.unseen_classes.tolist())
        if overlap:
            raise ValueError(f"'{self.dataset_folder()}': classes {sorted(overlap)[:5]} are in both trainval_loc and "
                             "test_unseen_loc; zero-shot splits keep the unseen classes out of training")
        stray = set(labels[test_seen].unique().tolist()) - set(self.seen_classes.tolist())
        if stray:
            raise ValueError(f"'{self.dataset_folder()}': test_seen_loc holds classes {sorted(stray)[:5]} that "
                             "trainval_loc does not")
        if self.unseen_prior is not None:
            test_unseen = self._subsample(test_unseen, labels[test_unseen])
        self.class_names = data.class_names
        self.attributes = attributes
        self.train_features, self.train_labels = features[trainval], labels[trainval]
        self.unseen_features = features[test_unseen]
        self.unseen_class_counts = (labels[test_unseen].unsqueeze(1) == self.unseen_classes).sum(0)
        self.test_unseen_set = FeatureDataset(features[test_unseen], labels[test_unseen])
        self.test_seen_set = FeatureDataset(features[test_seen], labels[test_seen])
        self.feature_dim, self.attribute_dim = features.shape[1], attributes.shape[1]
        self._loaded = True

    def _subsample(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prior = torch.tensor(self.unseen_prior, dtype=torch.float64)
        if len(prior) != len(self.unseen_classes) or (prior <= 0).any():
            raise ValueError(f"unseen_prior needs {len(self.unseen_classes)} positive proportions (one per unseen "
                             f"class, in the order {self.unseen_classes.tolist()}), got {self.unseen_prior}")
        prior = prior / prior.sum()
        counts = (labels.unsqueeze(1) == self.unseen_classes).sum(0).double()
        total = float((counts / prior).min())  # the largest set with these proportions that the split can fill
        keep_per_class = (prior * total).floor().long().clamp_min(1)
        generator = torch.Generator().manual_seed(self.prior_seed)
        kept = []
        for c, keep in zip(self.unseen_classes.tolist(), keep_per_class.tolist()):  # once per class at setup
            members = rows[labels == c]
            kept.append(members[torch.randperm(len(members), generator=generator)[:keep]])
        return torch.cat(kept).sort().values

    # ---- loaders ----------------------------------------------------------------------------------------------

    def train_dataloader(self) -> Any:
        self.setup("fit")
        iterations = math.ceil(len(self.train_labels) / self.batch_size)
        rank, world = self._world()
        return self.batch_sampler_loader(_Iterations(iterations), RandomBatchSampler(iterations, 1, rank=rank,
                                                                                     world_size=world))

    def evaluation_sets(self, split: str) -> list[Dataset]:
        self.setup(split)
        return [self.test_unseen_set, self.test_seen_set]

    @property
    def num_classes(self) -> int:
        """All classes of the dataset (seen and unseen); reading it reads the files."""
        self.setup()
        return len(self.attributes)


class DigitsZSLDataModule(ZSLFeatureDataModule):
    """The embedded default: sklearn's digits written as an xlsa17 pair (``datamodules.generated.zsl_digits``) and
    read back through ``read_xlsa17``; seven-segment attributes, ``unseen_classes`` held out.

    Args:
        root: where the generated set lives; each ``unseen_classes`` / ``features`` / ``split_seed`` gets its own
            sub-folder, since the features depend on which classes the feature network saw.
        unseen_classes: the held-out digits (the spec's splits: (2, 4, 7), (0, 5, 9), (1, 3, 8)).
        features: ``"pixels"`` (standardised pixels, the default) or ``"mlp"`` (a seen-classes-only network's
            features; they separate the unseen digits worse: k-means purity on test_unseen 0.79 / 0.73 / 0.53 vs
            0.96 / 0.88 / 0.65 for pixels on the three splits, since the network maps unseen digits onto seen ones).
        split_seed: the seed of the 80 / 20 trainval / test_seen split and of the feature network.
    """

    def __init__(self, root: str = "data/zsl_digits", unseen_classes: Sequence[int] = (2, 4, 7), *,
                 features: str = "pixels", split_seed: int = 0, l2_norm: bool = True, radius: float = 1.0,
                 batch_size: int = 64, unseen_prior: Optional[Sequence[float]] = None, prior_seed: int = 0,
                 eval_batch_size: Optional[int] = 1024, num_workers: int = 0) -> None:
        self.unseen_digits = sorted(int(c) for c in unseen_classes)
        self.features_kind, self.split_seed = features, split_seed
        base = Path(root).expanduser() / f"unseen_{'_'.join(map(str, self.unseen_digits))}_{features}_s{split_seed}"
        super().__init__(str(base), "DIGITS", l2_norm=l2_norm, radius=radius, batch_size=batch_size,
                         unseen_prior=unseen_prior, prior_seed=prior_seed, eval_batch_size=eval_batch_size,
                         num_workers=num_workers)

    def prepare_data(self) -> None:
        from datamodules.generated.zsl_digits import write_zsl_digits  # noqa: PLC0415

        write_zsl_digits(self.root, self.unseen_digits, self.features_kind, self.split_seed)

    def setup(self, stage: Optional[str] = None) -> None:
        if not self._loaded and not (self.dataset_folder() / "att_splits.mat").exists():
            self.prepare_data()  # used outside a Trainer (tests, notebooks, benches)
        super().setup(stage)
