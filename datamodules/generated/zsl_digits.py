"""The digits as a zero-shot set in the xlsa17 format: seven-segment attributes, unseen digits held out.

Xian et al.'s xlsa17 release ships, per dataset, ``res101.mat`` (ResNet-101 features and labels) and
``att_splits.mat`` (class attributes and the proposed-split locations). This generator writes the same two files for
sklearn's digits, so that the embedded default goes through the real loader (``datamodules.zsl.read_xlsa17``):

    <root>/DIGITS/res101.mat       features (d, N) float, labels (N, 1) 1-based, image_files (N, 1) cell
    <root>/DIGITS/att_splits.mat   att (A, 10), original_att (A, 10), allclasses_names (10, 1) cell,
                                   trainval_loc / test_seen_loc / test_unseen_loc (n, 1), 1-based rows of res101
    <root>/DIGITS/features.json    how the features were made, and the feature network's accuracy on test_seen
    <root>/generated.json          the parameters, written last (``install_generated``)

**Attributes** (the spec's table, 10 per digit): the seven segments a–g of a seven-segment display, loops / 2,
"has a diagonal stroke" and "vertically symmetric". Every pair of digits differs (tested).

**Features** play the part of res101's: what a network that never saw an unseen class makes of every image. Either
``"mlp"``, the 64-d penultimate layer of an MLP 64→128→64→|seen| trained with cross-entropy on the *trainval images
of the seen classes only* (the unseen images go through it only after training, as ImageNet-trained ResNet features
do for xlsa17's unseen classes), or ``"pixels"``: the 64 pixels standardised with trainval statistics.

**Split**: ``unseen_classes`` are held out entirely (all their images are ``test_unseen``); the images of the seen
classes are split 80 / 20 (stratified, ``split_seed``) into ``trainval`` and ``test_seen``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.io import savemat
from sklearn.model_selection import train_test_split
from torch import nn

from datamodules.digits import load_digit_images
from datamodules.generated.install import install_generated

__all__ = ["SEGMENT_ATTRIBUTES", "ATTRIBUTE_NAMES", "digit_attributes", "write_zsl_digits"]

ATTRIBUTE_NAMES = ("seg_a_top", "seg_b_top_right", "seg_c_bottom_right", "seg_d_bottom", "seg_e_bottom_left",
                   "seg_f_top_left", "seg_g_middle", "loops_half", "has_diagonal", "vertical_symmetry")

#: segments a b c d e f g of each digit 0..9 on a seven-segment display
SEGMENT_ATTRIBUTES = ("1111110", "0110000", "1101101", "1111001", "0110011",
                      "1011011", "1011111", "1110000", "1111111", "1111011")
_LOOPS_HALF = {0: 0.5, 4: 0.5, 6: 0.5, 8: 1.0, 9: 0.5}
_DIAGONAL = {2: 1.0, 7: 1.0, 4: 0.5}
_SYMMETRY = {0: 1.0, 8: 1.0, 1: 0.5}


def digit_attributes() -> np.ndarray:
    """The (10, 10) attribute matrix, one row per digit, columns ``ATTRIBUTE_NAMES``."""
    rows = []
    for digit, segments in enumerate(SEGMENT_ATTRIBUTES):
        rows.append([float(s) for s in segments]
                    + [_LOOPS_HALF.get(digit, 0.0), _DIAGONAL.get(digit, 0.0), _SYMMETRY.get(digit, 0.0)])
    return np.asarray(rows, dtype=np.float64)


def _seen_only_features(pixels: np.ndarray, labels: np.ndarray, trainval: np.ndarray, seen: Sequence[int],
                        seed: int, epochs: int = 20) -> tuple[np.ndarray, dict]:
    """Train the MLP on the seen trainval images only and return every image's 64-d penultimate features."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    remap = {c: i for i, c in enumerate(seen)}
    x = torch.from_numpy(pixels[trainval]).float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    y = torch.tensor([remap[int(c)] for c in labels[trainval]])
    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    head = nn.Linear(64, len(seen))
    optimizer = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(head(body((x[batch] - mean) / std)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        features = body((torch.from_numpy(pixels).float() - mean) / std).numpy()
    return features.astype(np.float32), {"kind": "mlp", "epochs": epochs, "widths": [64, 128, 64],
                                         "trained_on": "trainval images of the seen classes"}


def write_zsl_digits(root: str | Path, unseen_classes: Sequence[int] = (2, 4, 7), features: str = "pixels",
                     split_seed: int = 0, overwrite: bool = False) -> Path:
    """Install the set at ``root`` (once per parameter set) and return ``root / "DIGITS"``."""
    unseen = sorted(int(c) for c in unseen_classes)
    if len(set(unseen)) != len(unseen) or not unseen or not set(unseen) < set(range(10)):
        raise ValueError(f"unseen_classes must be distinct digits 0..9, a proper subset; got {list(unseen_classes)}")
    if features not in ("mlp", "pixels"):
        raise ValueError(f"features must be 'mlp' or 'pixels', got {features!r}")

    def write(folder: Path) -> None:
        images, labels_t = load_digit_images()
        pixels, labels = images.flatten(1).numpy().astype(np.float64), labels_t.numpy()
        seen = [c for c in range(10) if c not in unseen]
        seen_rows = np.flatnonzero(np.isin(labels, seen))
        trainval, test_seen = train_test_split(seen_rows, test_size=0.2, stratify=labels[seen_rows],
                                               random_state=split_seed)
        trainval, test_seen = np.sort(trainval), np.sort(test_seen)
        test_unseen = np.flatnonzero(np.isin(labels, unseen))
        if features == "mlp":
            feats, info = _seen_only_features(pixels, labels, trainval, seen, split_seed)
        else:
            mean, std = pixels[trainval].mean(0), pixels[trainval].std(0) + 1e-3
            feats, info = ((pixels - mean) / std).astype(np.float32), {"kind": "pixels", "standardised": "trainval"}
        data = folder / "DIGITS"
        data.mkdir(parents=True)
        names = np.empty((10, 1), dtype=object)
        names[:, 0] = [f"digit_{c}" for c in range(10)]
        files = np.empty((len(labels), 1), dtype=object)
        files[:, 0] = [f"sklearn_digits/{i:04d}" for i in range(len(labels))]
        savemat(data / "res101.mat", {"features": feats.T, "labels": (labels + 1).reshape(-1, 1).astype(np.float64),
                                      "image_files": files})
        att = digit_attributes()
        one_based = {name: (rows + 1).reshape(-1, 1).astype(np.float64) for name, rows in
                     (("trainval_loc", trainval), ("test_seen_loc", test_seen), ("test_unseen_loc", test_unseen))}
        savemat(data / "att_splits.mat", {"att": att.T, "original_att": att.T, "allclasses_names": names, **one_based})
        (data / "features.json").write_text(json.dumps({**info, "unseen_classes": unseen}, indent=1) + "\n")

    root = install_generated(root, generator="zsl_digits", version=1,
                             params={"unseen_classes": unseen, "features": features, "split_seed": split_seed},
                             write=write, overwrite=overwrite)
    return Path(root) / "DIGITS"
