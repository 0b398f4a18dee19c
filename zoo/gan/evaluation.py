"""How translations are scored: KID on a feature extractor, content preservation, and the sample grid.

* **KID** (Bińkowski et al. 2018, the metric of U-GAT-IT's Table 3 and NICE-GAN's): the unbiased squared MMD with the
  cubic polynomial kernel ``k(x, y) = (xᵀy / d + 1)³`` between features of translated and real target-domain test
  images, averaged over random subsets (``torchmetrics``' ``poly_mmd``); reported ×100 as the papers do. The subset
  size is clipped to the smaller sample (100 test images per domain on selfie2anime), with a fixed generator so a
  checkpoint always gets the same number.
* **Features**: ``"inception"`` — torchmetrics' FID Inception-v3 (pool3, 2048-d; needs ``torch-fidelity`` and its
  weights, the papers' choice); ``"judge"`` — a small CNN trained at the start of evaluation on the *training* images
  of both domains to tell the domain and, where the dataset ships labels (the embedded digit domains do), the class.
  Its penultimate features feed KID; its class head scores **content preservation** (a translated image must keep its
  source's class) and its domain head the **target rate** (the share of translations it calls target-domain).
* **Baselines**, measured the same way at test time: the identity mapping (no translation; KID between the two real
  test sets) and an untrained generator of the same architecture.

The judge takes ~20 s to train on the digit domains (2 CPU cores), so it is cached on disk (``cached_judge``): the
file ``judge-<key>.pt`` in ``.judge_cache/`` next to the data root (or a folder of one's choice) is keyed by a hash
of everything that determines the judge: the decoded training images, labels and domains, the number of classes,
the training settings (epochs, batch size, lr, width, seed), the device type and the source code of the judge and its
training. A second run of a config loads it; a file whose key or weights do not fit is retrained and overwritten,
never trusted. Under ``fast_dev_run`` the judge is not built at all and its metrics are not logged.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import Dataset
from torchvision.utils import make_grid
from torchmetrics.image.kid import poly_mmd

from zoo.callbacks import ImageLogger, log_images, non_finite_tensors
from zoo.checkpoint import AtomicCheckpointIO
from zoo.distributed import gather_by_index

__all__ = [
    "kernel_inception_distance", "TranslationJudge", "train_judge", "judge_cache_key", "cached_judge",
    "TranslationMetrics", "TranslationGrid",
]


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of ``min(subset_size, len(real), len(fake))`` features each."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} real and {len(fake)} fake")
    generator = torch.Generator().manual_seed(seed)
    real, fake = real.double().cpu(), fake.double().cpu()
    scores = torch.stack([
        poly_mmd(real[torch.randperm(len(real), generator=generator)[:size]],
                 fake[torch.randperm(len(fake), generator=generator)[:size]], degree=3, gamma=None, coef=1.0)
        for _ in range(subsets)
    ])
    return float(scores.mean()), float(scores.std(unbiased=False))


class TranslationJudge(nn.Module):
    """Three conv-BN-ReLU-max-pool stages, then a 128-d fully connected layer (it keeps the layout of the 4×4 map,
    which a digit needs) with a domain head (A = 0, B = 1) and, when ``num_classes > 0``, a class head; ``features``
    is that layer rescaled to norm √128. Input: images in [−1, 1], resized to 32×32 inside."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*stage(in_channels, width), *stage(width, 2 * width), *stage(2 * width, 4 * width),
                                  nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU(inplace=True))
        self.domain_head = nn.Linear(feature_dim, 2)
        self.class_head = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(features, domain_logits, class_logits or None)``."""
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        hidden = self.body(images)
        classes = self.class_head(hidden) if self.class_head is not None else None
        # KID's kernel (xᵀy/d + 1)³ expects features of unit scale per coordinate, as Inception's pool3 roughly is:
        # rescaled to norm √d, xᵀy/d is the cosine similarity and the kernel stays in [0, 8].
        features = F.normalize(hidden, dim=1) * hidden.shape[1] ** 0.5
        return features, self.domain_head(hidden), classes


def _jitter(images: torch.Tensor, generator: torch.Generator, shift: float = 0.1, scale: float = 0.1) -> torch.Tensor:
    """Each image shifted by up to ``shift`` of its side and scaled by ``1 ± scale`` (one ``grid_sample``), so the
    judge reads a slightly misplaced translated digit as well as a real one."""
    n = len(images)
    factor = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2 * shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = factor, factor, offset
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def _judge_tensors(train_a: Dataset, train_b: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both domains' training items ``(image, label, ...)`` decoded once: ``(images, labels, domains)``, A = 0."""
    items = [(d[i][0], int(d[i][1]), domain) for domain, d in enumerate((train_a, train_b)) for i in range(len(d))]
    return (torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items]),
            torch.tensor([item[2] for item in items]))


def _train_judge_on(images: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, num_classes: int, epochs: int,
                    batch_size: int, lr: float, width: int, seed: int, device: torch.device | str) -> TranslationJudge:
    # Called from evaluation hooks, which run under inference mode: training needs autograd back.
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        judge = TranslationJudge(images.shape[1], num_classes, width).to(device)
        steps_per_epoch = -(-len(images) // batch_size)
        optimizer = torch.optim.Adam(judge.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
        judge.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                x = _jitter(images[batch], generator).to(device)
                y, domain = labels[batch].to(device), domains[batch].to(device)
                _, domain_logits, class_logits = judge(x)
                loss = F.cross_entropy(domain_logits, domain)
                if class_logits is not None and (y >= 0).any():
                    loss = loss + F.cross_entropy(class_logits[y >= 0], y[y >= 0])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return judge.eval().requires_grad_(False)


def train_judge(train_a: Dataset, train_b: Dataset, num_classes: int, epochs: int = 15, batch_size: int = 64,
                lr: float = 2e-3, width: int = 16, seed: int = 0, device: torch.device | str = "cpu"
                ) -> TranslationJudge:
    """Train a ``TranslationJudge`` on both domains' training images (items ``(image, label, ...)``, label −1 if
    unknown), deterministically from ``seed`` and without touching the global RNG; returned in eval mode.

    The images are decoded once and kept in memory; every batch is jittered (``_jitter``); the learning rate follows
    a cosine to zero.
    """
    images, labels, domains = _judge_tensors(train_a, train_b)
    return _train_judge_on(images, labels, domains, num_classes, epochs, batch_size, lr, width, seed, device)


def judge_cache_key(images: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, num_classes: int,
                    settings: dict[str, Any]) -> str:
    """SHA-256 of what determines a trained judge: the training tensors, the number of classes, the training
    ``settings`` (JSON-serialisable: epochs, batch size, lr, width, seed, device type) and the source code of the
    judge, the jitter and the training loop (an edit to them invalidates every cached judge)."""
    digest = hashlib.sha256()
    for tensor in (images.float(), labels.long(), domains.long()):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps({"num_classes": num_classes, **settings}, sort_keys=True).encode())
    for code in (TranslationJudge, _jitter, _train_judge_on):
        digest.update(inspect.getsource(code).encode())
    return digest.hexdigest()


def cached_judge(train_a: Dataset, train_b: Dataset, num_classes: int, cache_dir: Optional[str | Path],
                 epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, width: int = 16, seed: int = 0,
                 device: torch.device | str = "cpu", write: bool = True
                 ) -> tuple[TranslationJudge, str, Optional[Path]]:
    """``train_judge`` through a disk cache: ``(judge, "cache" | "trained", cache file or None)``.

    The file is ``<cache_dir>/judge-<key>.pt`` (``judge_cache_key``). It is used only when it holds that key and
    weights that load into the architecture and are finite; anything else (another key, a truncated or foreign file)
    is reported, retrained and overwritten. ``write`` (rank 0 under DDP) saves a freshly trained judge atomically, so
    a concurrent reader never sees half a file. ``cache_dir=None`` trains without a cache.
    """
    images, labels, domains = _judge_tensors(train_a, train_b)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "width": width, "seed": seed,
                "in_channels": int(images.shape[1]), "device_type": torch.device(device).type}
    path = None
    if cache_dir is not None:
        key = judge_cache_key(images, labels, domains, num_classes, settings)
        path = Path(cache_dir).expanduser() / f"judge-{key[:24]}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(saved, dict) or saved.get("key") != key:
                    raise ValueError("it was saved for other data or settings")
                judge = TranslationJudge(int(images.shape[1]), num_classes, width)
                judge.load_state_dict(saved["state_dict"])
                if non_finite_tensors({"state_dict": judge.state_dict()}):
                    raise ValueError("it holds non-finite weights")
                return judge.to(device).eval().requires_grad_(False), "cache", path
            except Exception as err:  # noqa: BLE001 - any unreadable cache file is retrained, whatever the cause
                rank_zero_warn(f"the cached judge '{path}' cannot be used ({type(err).__name__}: {err}); retraining it")
    judge = _train_judge_on(images, labels, domains, num_classes, epochs, batch_size, lr, width, seed, device)
    if path is not None and write:
        AtomicCheckpointIO().save_checkpoint({"key": key, "settings": settings, "num_classes": num_classes,
                                              "state_dict": {k: v.detach().cpu() for k, v in judge.state_dict().items()}},
                                             path)
    return judge, "trained", path


class _InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 pool3 features of images in [−1, 1] (resized inside to 299)."""

    def __init__(self) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except (ImportError, ModuleNotFoundError) as err:
            raise ModuleNotFoundError("TranslationMetrics(features='inception') needs torch-fidelity and its Inception "
                                      "weights (downloaded on first use): pip install torch-fidelity; or use "
                                      "features='judge'") from err

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return self.net(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)), None, None


class TranslationMetrics(Callback):
    """KID (×100), content accuracy and target rate of both translations after every validation and test.

    Logs ``{stage}/kid_x100_a2b``, ``…_b2a``, ``{stage}/kid_x100`` (their mean: a checkpoint monitor),
    ``{stage}/content_acc_*`` (with class labels) and ``{stage}/target_rate_*`` (judge features); at test time also
    the same numbers for ``identity_`` and ``untrained_`` translations. Under DDP every rank translates its shard;
    features are all-gathered and every rank computes the same numbers.

    Args:
        features: ``"judge"`` or ``"inception"`` (see the module docstring).
        subsets, subset_size: KID's random subsets.
        judge_epochs: training epochs of the judge.
        baselines: at test time, also score the identity mapping and an untrained generator.
        seed: the judge's and KID's seed.
        judge_cache: folder of the trained judges (``cached_judge``): ``"auto"`` is ``.judge_cache`` next to the
            datamodule's ``root`` (or in the run folder's parent when the datamodule has none); ``null`` trains the
            judge every run.

    Under ``fast_dev_run`` the judge features are skipped: no judge is trained and nothing is logged (one info
    line says so). ``judge_origin`` says where the judge came from: ``"trained"``, ``"cache"`` or ``"skipped"``.
    """

    def __init__(self, features: str = "judge", subsets: int = 100, subset_size: int = 1000, judge_epochs: int = 15,
                 baselines: bool = True, seed: int = 0, judge_cache: Optional[str] = "auto") -> None:
        if features not in ("judge", "inception"):
            raise ValueError(f"features must be 'judge' or 'inception', got {features!r}")
        self.features, self.subsets, self.subset_size = features, subsets, subset_size
        self.judge_epochs, self.baselines, self.seed, self.judge_cache = judge_epochs, baselines, seed, judge_cache
        self.judge_origin: Optional[str] = None
        self._active = True
        self.extractor: Optional[nn.Module] = None
        self._outputs: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._untrained: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    # ---- the feature extractor --------------------------------------------------------------------------------

    def _build_extractor(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> nn.Module:
        if self.features == "inception":
            return _InceptionFeatures().to(pl_module.device).eval()
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "judge_training_sets"):
            raise RuntimeError("TranslationMetrics(features='judge') needs a datamodule with judge_training_sets() "
                               "(datamodules.gan.UnpairedDataModule)")
        train_a, train_b, num_classes = datamodule.judge_training_sets()
        judge, self.judge_origin, path = cached_judge(
            train_a, train_b, num_classes, self._judge_cache_dir(trainer), epochs=self.judge_epochs, seed=self.seed,
            device=pl_module.device, write=trainer.is_global_zero)
        if path is not None:
            done = "loaded from" if self.judge_origin == "cache" else "trained, cached in"
            rank_zero_info(f"[zoo] TranslationMetrics: judge {done} {path}")
        if trainer.world_size > 1:  # every rank trained the same judge; make it bit-identical anyway
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in judge.state_dict().items()}, src=0)
            judge.load_state_dict(state)
        return judge

    def _judge_cache_dir(self, trainer: "L.Trainer") -> Optional[Path]:
        if self.judge_cache is None or self.judge_cache == "":
            return None
        if self.judge_cache != "auto":
            return Path(self.judge_cache)
        # Next to the data, not inside it (the embedded sets refuse a root holding anything else); with no data root
        # the run folder's parent, which the runs of one config share.
        root = getattr(trainer.datamodule, "root", None)
        base = Path(root).expanduser().resolve().parent if root is not None else Path(trainer.default_root_dir).parent
        return base / ".judge_cache"

    def _start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        self._active = not (self.features == "judge" and trainer.fast_dev_run)
        if not self._active:
            if self.judge_origin != "skipped":
                rank_zero_info("[zoo] TranslationMetrics: fast_dev_run, so the judge is not trained and no KID, "
                               "content or target-rate metric is logged")
            self.judge_origin = "skipped"
            return
        if self.extractor is None:
            self.extractor = self._build_extractor(trainer, pl_module)
        self._outputs = {}
        self._untrained = {}
        if stage == "test" and self.baselines:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._untrained = {d: pl_module.untrained_translator(d) for d in ("a2b", "b2a")}

    def on_validation_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._start(trainer, pl_module, "test")

    # ---- per batch: features only are kept ------------------------------------------------------------------

    @torch.no_grad()
    def _collect(self, outputs: dict[str, Any]) -> None:
        if not self._active:
            return
        direction = outputs["direction"]
        store = self._outputs.setdefault(direction, {})
        translations = {"": outputs["fake"]}
        if direction in self._untrained:
            translations["untrained_"] = self._untrained[direction](outputs["real"])
        store.setdefault("labels", []).append(outputs["labels"])
        store.setdefault("index", []).append(outputs["index"])
        # the identity mapping's "translations" are the real images: their features are computed once
        real = self.extractor(outputs["real"].float())
        store.setdefault("real", []).append(real[0].float())
        for prefix, judged in [("identity_", real), *((p, self.extractor(x.float())) for p, x in translations.items())]:
            features, domain_logits, class_logits = judged
            store.setdefault(prefix + "features", []).append(features.float())
            if domain_logits is not None:
                store.setdefault(prefix + "domain", []).append(domain_logits.argmax(1))
            if class_logits is not None:
                store.setdefault(prefix + "class", []).append(class_logits.argmax(1))

    def on_validation_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._collect(outputs)

    def on_test_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs)

    # ---- per epoch: gather, score, log -------------------------------------------------------------------------

    def _score(self, pl_module: "L.LightningModule", stage: str) -> None:
        if not self._active:
            return
        if set(self._outputs) != {"a2b", "b2a"}:
            self._outputs = {}
            return  # e.g. a limited validation that never reached testB
        gathered = {}
        for direction, store in self._outputs.items():
            joined = {k: torch.cat(v) for k, v in store.items()}
            gathered[direction] = gather_by_index(pl_module, joined.pop("index"), **joined)
        self._outputs = {}
        target_real = {"a2b": gathered["b2a"]["real"], "b2a": gathered["a2b"]["real"]}
        metrics: dict[str, float] = {}
        for direction, data in gathered.items():
            for prefix in ("", "identity_", "untrained_"):
                if prefix + "features" not in data:
                    continue
                kid, _ = kernel_inception_distance(target_real[direction], data[prefix + "features"], self.subsets,
                                                   self.subset_size, self.seed)
                metrics[f"{prefix}kid_x100_{direction}"] = 100 * kid
                if prefix + "domain" in data:
                    target = 1 if direction == "a2b" else 0
                    metrics[f"{prefix}target_rate_{direction}"] = float((data[prefix + "domain"] == target).float().mean())
                labelled = data["labels"] >= 0
                if prefix + "class" in data and labelled.any():
                    hits = data[prefix + "class"][labelled] == data["labels"][labelled]
                    metrics[f"{prefix}content_acc_{direction}"] = float(hits.float().mean())
        metrics["kid_x100"] = (metrics["kid_x100_a2b"] + metrics["kid_x100_b2a"]) / 2
        for name, value in metrics.items():
            # every rank computed the same numbers from the gathered features: no reduction
            pl_module.log(f"{stage}/{name}", value, prog_bar=name == "kid_x100")

    def on_validation_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._score(pl_module, "val")

    def on_test_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._score(pl_module, "test")


class TranslationGrid(ImageLogger):
    """After validation (``zoo.callbacks.ImageLogger``'s cadence) and test, the first ``num_images`` test images of
    each domain: rows of real, translation, and cycle back (real → other domain → real domain)."""

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.num_images = num_images

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        datamodule = trainer.datamodule
        test_sets = getattr(datamodule, "test_sets", None)
        if not test_sets:
            return
        rows = []
        for domain, (forward, back) in zip(("A", "B"), (("a2b", "b2a"), ("b2a", "a2b"))):
            dataset = test_sets[domain]
            count = min(self.num_images, len(dataset))
            real = torch.stack([dataset[i][0] for i in range(count)]).to(pl_module.device)
            fake = pl_module.translate(real, forward)
            rows += [real, fake, pl_module.translate(fake, back)]
        width = max(len(r) for r in rows)
        rows = [torch.cat([r, r.new_full((width - len(r), *r.shape[1:]), 1.0)]) if len(r) < width else r for r in rows]
        grid = make_grid((torch.cat(rows).float().cpu().clamp(-1, 1) + 1) / 2, nrow=width, padding=2, pad_value=1.0)
        log_images(trainer, f"{stage}/translations", grid.unsqueeze(0), ["rows: A, A→B, A→B→A, B, B→A, B→A→B"],
                   png_name=f"translations/{stage}_epoch{trainer.current_epoch:03d}.png")
