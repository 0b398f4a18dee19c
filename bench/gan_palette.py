"""Which palette colours a translator paints the digit default's A→B translations in (an analysis, not a timing).

    python bench/gan_palette.py runs/ugatit_digits/checkpoints/*.ckpt [--root data/digit_domains]

Domain B of the embedded default draws each image's strokes in one of the 8 ``NEON_PALETTE`` colours. A→B has to
invent that colour (greyscale A holds none), so a translator that paints every digit the same colour still looks like
B to a discriminator that sees one image at a time. For every checkpoint this translates the test A images and,
for each translation, takes the mean colour of its stroke pixels (channel spread > 0.3, as the data tests define a
stroke), scales it to its brightest channel (the stripes modulate brightness) and assigns it to the nearest palette
colour scaled the same way. It prints the share of each palette colour, how many colours at least 5 % of the images
get, and the entropy of the shares over log 8 (1 = all eight equally often; real B images give ~1). The first row is
the real test B images, scored the same way.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.gan import DigitDomainsDataModule  # noqa: E402
from datamodules.generated.gan_digit_domains import NEON_PALETTE  # noqa: E402

PALETTE = torch.tensor(NEON_PALETTE, dtype=torch.float32) / 255
PALETTE = PALETTE / PALETTE.amax(dim=1, keepdim=True)


def palette_shares(images: torch.Tensor) -> torch.Tensor:
    """``images (N, 3, H, W)`` in [0, 1] → the share of images whose strokes are nearest each palette colour (8,);
    images without stroke pixels are left out."""
    stroke = (images.amax(dim=1) - images.amin(dim=1)) > 0.3  # (N, H, W)
    counts = stroke.flatten(1).sum(1)
    mean = (images * stroke[:, None]).flatten(2).sum(2) / counts.clamp(min=1)[:, None]  # (N, 3)
    mean = mean[counts > 0]
    mean = mean / mean.amax(dim=1, keepdim=True).clamp(min=1e-6)
    nearest = torch.cdist(mean, PALETTE).argmin(dim=1)
    return torch.bincount(nearest, minlength=len(PALETTE)).float() / max(len(nearest), 1)


def describe(name: str, shares: torch.Tensor) -> str:
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * nonzero.log()).sum() / math.log(len(shares)))
    cells = " ".join(f"{100 * s:4.0f}" for s in shares.tolist())
    return f"{name:48s} {cells}   {int((shares >= 0.05).sum()):2d}   {entropy:.2f}"


def load(path: str) -> torch.nn.Module:
    hparams = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    module, _, name = hparams["_class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls.load_from_checkpoint(path, map_location="cpu").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--root", default="data/digit_domains")
    opts = parser.parse_args()
    data = DigitDomainsDataModule(root=opts.root, image_size=32, load_size=None)
    data.setup("test")
    test_a = torch.stack([data.test_a[i][0] for i in range(len(data.test_a))])  # [-1, 1]
    test_b = torch.stack([data.test_b[i][0] for i in range(len(data.test_b))])
    print(f"{'':48s} {' '.join(f'{i:>4d}' for i in range(len(PALETTE)))}   ≥5%  entropy")
    print(describe("real test B", palette_shares((test_b + 1) / 2)))
    for path in opts.checkpoints:
        model = load(path)
        with torch.no_grad():
            fake = torch.cat([model.translate(chunk, "a2b") for chunk in test_a.split(64)])
        print(describe(Path(path).parent.parent.name + "/" + Path(path).name, palette_shares((fake.clamp(-1, 1) + 1) / 2)))


if __name__ == "__main__":
    main()
