"""ECN: Exemplar Memory for domain-adaptive person re-ID (Zhong, Zheng, Luo, Li & Yang, "Invariance Matters:
Exemplar Memory for Domain Adaptive Person Re-identification", CVPR 2019, https://arxiv.org/abs/1904.01990).

One network learns the labeled source domain with an identity classifier and the unlabeled target domain through an
*exemplar memory*: one L2-normalised slot per target training image, kept outside the optimiser (§3.2). A target
image's embedding is classified over all slots with temperature β (eq. 3), which asks for three invariances:

* exemplar invariance (eq. 4): an image matches its own slot, not the others;
* camera invariance (eq. 5): a CamStyle copy of the image in another camera's style matches the original's slot;
  the target loader serves those copies (``datamodules.reid.CamStyleTargetDataset``), the loss is the same;
* neighbourhood invariance (eq. 6-8): from epoch 5 on, the ``k`` slots nearest to the embedding are soft positives
  with weight ``1/k``, the own slot weight 1.

After every step the slots of the batch move towards the new embeddings, ``K[i] ← ‖α K[i] + (1 − α) f‖`` with
``α = 0.01 × epoch`` (eq. 2; epoch 0 overwrites); the loss of that step used the slots *before* the update, as in the
official code, which updates inside the backward pass. Total loss ``(1 − λ) L_src + λ L_tgt`` (eq. 9), λ = 0.3.

The official code's details are kept, each behind a flag: ResNet-50 up to ``layer2`` frozen and those layers' BN
modules whose names contain ``bn`` kept in eval mode (so the downsample BNs still update their statistics); the
target feature is dropped out *after* normalisation, so the memory sees dropped-out vectors; test features are the
L2-normalised pooled backbone features (``pool5``), ranked by Euclidean distance. ``zoo predict`` writes the rank
lists of the test split or of one's own query/gallery folders (``zoo.reid.predict.RankListWriter``).

Under DDP every rank all-gathers the embeddings and indices of the step before updating, so all ranks hold the same
memory; the memory is a persistent buffer, so checkpoints and resumes carry it, and ``α`` follows the restored epoch.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from zoo.contracts import check_num_classes, feature_channels
from zoo.distributed import gather_by_index
from zoo.reid.callbacks import log_cmc
from zoo.reid.evaluation import rank_lists, reid_metrics
from zoo.reid.predict import RankListWriter
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["ExemplarMemory", "neighbourhood_targets", "invariance_loss", "EmbeddingHead", "ECN"]


class ExemplarMemory(nn.Module):
    """``num_slots × dim`` L2-normalised slots, one per target training image (zeros until first written).

    The slots are a persistent buffer in fp32: they travel with ``state_dict`` and checkpoints but are never seen by
    an optimiser, and no gradient flows into them.
    """

    def __init__(self, num_slots: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("slots", torch.zeros(num_slots, dim))

    def resize_(self, num_slots: int) -> None:
        """Re-create the memory with ``num_slots`` empty slots (the model's memory is sized from the data)."""
        self.slots = self.slots.new_zeros(num_slots, self.slots.shape[1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Similarities ``f · K[j]`` to every slot, in fp32 even under autocast (``(B, num_slots)``)."""
        with torch.autocast(features.device.type, enabled=False):
            return features.float() @ self.slots.T

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor, alpha: float) -> None:
        """``K[i] ← normalise(α K[i] + (1 − α) f)`` for the batch's slots; other slots are untouched (eq. 2).

        An index that occurs more than once in the batch (a sampler that repeats items) is updated once with the
        mean of its features.
        """
        features = features.detach().float()
        unique, inverse = torch.unique(indices, return_inverse=True)
        if len(unique) < len(indices):
            summed = torch.zeros(len(unique), features.shape[1], device=features.device).index_add_(0, inverse, features)
            counts = torch.bincount(inverse, minlength=len(unique)).clamp_min(1)
            features, indices = summed / counts[:, None], unique
        mixed = alpha * self.slots[indices] + (1.0 - alpha) * features
        self.slots[indices] = F.normalize(mixed, dim=1)


def neighbourhood_targets(similarity: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """ECN's soft targets (eq. 7-8, ``smooth_hot`` in the official code): weight ``1/k`` on the ``k`` most similar
    slots, then weight 1 on the image's own slot. The rows are not renormalised: they sum to ``1 + (k − 1)/k`` when
    the own slot is among the top ``k`` and to 2 otherwise, exactly as the official loss weights them.
    """
    targets = torch.zeros_like(similarity, dtype=torch.float32)
    top = similarity.detach().topk(k, dim=1).indices
    targets.scatter_(1, top, 1.0 / k)
    targets.scatter_(1, indices[:, None], 1.0)
    return targets


def invariance_loss(logits: torch.Tensor, indices: torch.Tensor, k: int = 0) -> torch.Tensor:
    """The target loss on memory logits ``f·K/β``: cross-entropy to the own slot (exemplar and camera invariance,
    eq. 4-5), or with ``k > 0`` the neighbourhood-weighted log-likelihood ``−Σ_j w_j log p_j`` (eq. 8), batch mean."""
    if k <= 0:
        return F.cross_entropy(logits, indices)
    targets = neighbourhood_targets(logits, indices, k)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class EmbeddingHead(nn.Module):
    """Pooled features → FC → BN, shared by both domains (the official ``feat`` + ``feat_bn``).

    ``source_logits``: ReLU → dropout → identity classifier. ``target_embedding``: L2-normalise → dropout (the
    official order, ``dropout_after_normalize=True``; ``False`` renormalises after the dropout).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 4096, dropout: float = 0.5,
                 dropout_after_normalize: bool = True) -> None:
        super().__init__()
        self.feat = nn.Linear(in_dim, dim)
        self.feat_bn = nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)
        self.dropout_after_normalize = dropout_after_normalize
        nn.init.kaiming_normal_(self.feat.weight, mode="fan_out")
        nn.init.zeros_(self.feat.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def source_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(F.relu(self.feat_bn(self.feat(pooled)))))

    def target_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        x = self.feat_bn(self.feat(pooled))
        if self.dropout_after_normalize:
            return self.drop(F.normalize(x, dim=1))
        return F.normalize(self.drop(x), dim=1)


class ECN(L.LightningModule):
    """ECN as a LightningModule: source identity classification + exemplar-memory invariance on the target.

    Batches (``datamodules.reid.CrossDomainReIDDataModule``): training ``{"source": (images, labels, ...),
    "target": (images, indices)}``; validation/test two loaders, query then gallery, of ``(images, pids, cameras,
    indices)``, scored by CMC/mAP at the end of the epoch (features gathered across ranks by index). ``predict``
    returns ``{"features", "pids", "cameras", "indices"}`` per batch.

    Args:
        backbone: returns a ``(B, C, H, W)`` map and exposes ``out_channels`` (``zoo.backbones.TimmBackbone``
            ``resnet50`` as in the paper, or a small ``ConvNet``).
        num_classes: source identities (751 on Market, 702 on Duke); checked against the data.
        num_target_images: memory slots; ``None`` sizes the memory from the datamodule in ``setup``.
        embedding_dim: FC width (4096). dropout: 0.5.
        target_weight: λ of eq. 9 (0.3); 0 trains on the source only (the baseline) and skips the target pass.
        temperature: β (0.05). alpha_per_epoch: α = ``alpha_per_epoch × epoch`` (0.01).
        neighbours: ``k`` of neighbourhood invariance (6); 0 disables it.
        neighbour_start_epoch: first epoch (0-based) with neighbourhood invariance (5: the official ``epoch > 4``).
        frozen_modules: backbone submodule names whose parameters are frozen (official, timm ResNet-50:
            ``[model.conv1, model.bn1, model.layer1, model.layer2]``; only sensible with pretrained weights).
        frozen_bn: BN modules of the frozen part held in eval mode: ``"official"`` (names containing ``bn``, which
            misses the downsample BNs), ``"all"`` or ``"none"``.
        dropout_after_normalize: the official target-feature order (see ``EmbeddingHead``).
        lr: new layers' learning rate (0.1); backbone_lr_mult: backbone's factor (0.1).
        momentum, weight_decay, nesterov: SGD (0.9, 5e-4, True). lr_step_epoch, lr_gamma: ×0.1 at epoch 40.
        eval_feature: ``"pool5"`` (official) or ``"embedding"`` (the normalised FC+BN output).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        num_target_images: int | None = None,
        embedding_dim: int = 4096,
        dropout: float = 0.5,
        target_weight: float = 0.3,
        temperature: float = 0.05,
        alpha_per_epoch: float = 0.01,
        neighbours: int = 6,
        neighbour_start_epoch: int = 5,
        frozen_modules: Sequence[str] = (),
        frozen_bn: str = "official",
        dropout_after_normalize: bool = True,
        lr: float = 0.1,
        backbone_lr_mult: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        lr_step_epoch: int = 40,
        lr_gamma: float = 0.1,
        eval_feature: str = "pool5",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        if frozen_bn not in ("official", "all", "none"):
            raise ValueError(f"frozen_bn must be 'official', 'all' or 'none', got {frozen_bn!r}")
        if eval_feature not in ("pool5", "embedding"):
            raise ValueError(f"eval_feature must be 'pool5' or 'embedding', got {eval_feature!r}")
        self.backbone = backbone
        self.head = EmbeddingHead(feature_channels(backbone), num_classes, embedding_dim, dropout, dropout_after_normalize)
        self.memory = ExemplarMemory(num_target_images or 0, embedding_dim)
        modules = dict(backbone.named_modules())
        unknown = [name for name in frozen_modules if name not in modules]
        if unknown:
            raise ValueError(f"frozen_modules {unknown} are not submodules of the backbone; e.g. "
                             f"{[n for n in modules if n and '.' not in n.removeprefix('model.')][:8]}")
        for name in frozen_modules:
            modules[name].requires_grad_(False)
        self._frozen_bns = [
            module for name in frozen_modules for sub, module in modules[name].named_modules(prefix=name)
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (frozen_bn == "all" or (frozen_bn == "official" and "bn" in sub))
        ]
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        #: rank lists of a few queries from the last evaluation: {"stage", "queries", "gallery", "correct"}
        self.last_rank_lists: dict[str, Any] | None = None

    # ---- networks -----------------------------------------------------------------------------------------------

    def pool5(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.backbone(images), 1).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Test features: L2-normalised ``pool5`` (or the normalised embedding), ``(B, D)``."""
        pooled = self.pool5(images)
        if self.hparams.eval_feature == "embedding":
            return F.normalize(self.head.feat_bn(self.head.feat(pooled)), dim=1)
        return F.normalize(pooled, dim=1)

    def train(self, mode: bool = True) -> "ECN":
        super().train(mode)
        if mode:
            for module in self._frozen_bns:  # official `set_model_train`: the frozen stages' BNs keep their statistics
                module.eval()
        return self

    # ---- setup and checkpoints ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        if stage == "fit":
            check_num_classes(self, what="source identities")
        slots = getattr(datamodule, "num_target_images", None) if stage == "fit" else None
        if slots is not None and slots != len(self.memory.slots):
            if self.hparams.num_target_images is not None:
                raise ValueError(f"model.num_target_images is {self.hparams.num_target_images} but the target "
                                 f"domain has {slots} training images")
            self.memory.resize_(slots)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The memory is sized from the data; a checkpoint brings its own size (called before load_state_dict).
        saved = checkpoint.get("state_dict", {}).get("memory.slots")
        if saved is not None and saved.shape[0] != len(self.memory.slots):
            self.memory.resize_(saved.shape[0])

    # ---- training -----------------------------------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        return self.hparams.alpha_per_epoch * self.current_epoch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        source_images, source_labels = batch["source"][0], batch["source"][1]
        source_logits = self.head.source_logits(self.pool5(source_images))
        source_loss = F.cross_entropy(source_logits, source_labels)
        log = dict(on_step=True, on_epoch=True, batch_size=len(source_labels))
        self.log("train/source_ce", source_loss, **log)
        self.log("train/source_acc", (source_logits.argmax(1) == source_labels).float().mean(), **log)
        loss = (1 - hp.target_weight) * source_loss
        if hp.target_weight > 0:
            if len(self.memory.slots) == 0:
                raise RuntimeError("the exemplar memory has no slots: set model.init_args.num_target_images or use "
                                   "a datamodule with `num_target_images`")
            target_images, target_indices = batch["target"][0], batch["target"][1]
            # A separate forward pass per domain, as the official trainer does (BN statistics per domain).
            embedding = self.head.target_embedding(self.pool5(target_images))
            logits = self.memory(embedding) / hp.temperature
            k = hp.neighbours if self.current_epoch >= hp.neighbour_start_epoch else 0
            target_loss = invariance_loss(logits, target_indices, k)
            loss = loss + hp.target_weight * target_loss
            self._pending = (embedding.detach(), target_indices)
            self.log("train/target_loss", target_loss, **log)
            self.log("train/own_slot_acc", (logits.argmax(1) == target_indices).float().mean(), **log)
        self.log("train/loss", loss, prog_bar=True, **log)
        return loss

    def on_after_backward(self) -> None:
        # After backward (the step's gradient used the old slots), before the next forward: eq. 2 on the whole
        # global batch, so that every DDP rank applies the same update to its copy of the memory. Not in
        # on_train_batch_end: that hook runs after the checkpoint callbacks, so a step's last.ckpt would hold the
        # memory one batch behind the weights.
        if self._pending is None:
            return
        embedding, indices = self._pending
        self._pending = None
        if self.trainer.world_size > 1:
            embedding = self.all_gather(embedding).flatten(0, 1)
            indices = self.all_gather(indices).flatten(0, 1)
        self.memory.update(embedding, indices, self.alpha)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        new = [p for p in self.head.parameters() if p.requires_grad]
        groups = [{"params": new, "lr": hp.lr, "name": "new_layers"}]
        if backbone:
            groups.append({"params": backbone, "lr": hp.lr * hp.backbone_lr_mult, "name": "backbone"})
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                    nesterov=hp.nesterov)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step_epoch, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- evaluation: query loader 0, gallery loader 1 -------------------------------------------------------------

    def _eval_step(self, batch: Any, dataloader_idx: int) -> None:
        images, pids, cams, indices = batch
        self._eval_outputs.setdefault(dataloader_idx, []).append((self(images).float(), pids, cams, indices))

    def _gather_split(self, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ranks' ``(features, pids, cams)`` of one loader, in dataset order (each rank held a strided shard)."""
        parts = self._eval_outputs.get(dataloader_idx, [])
        features, pids, cams, indices = (torch.cat([p[i] for p in parts]) for i in range(4))
        gathered = gather_by_index(self, indices, features=features, pids=pids, cams=cams)
        return gathered["features"], gathered["pids"], gathered["cams"]

    def _eval_epoch_end(self, stage: str) -> None:
        if not self._eval_outputs or self.trainer.sanity_checking:
            self._eval_outputs = {}
            return
        query = self._gather_split(0)
        gallery = self._gather_split(1)
        self._eval_outputs = {}
        try:
            metrics = reid_metrics(query[0], gallery[0], query[1], gallery[1], query[2], gallery[2])
        except ValueError as err:  # e.g. limit_val_batches left no query with a cross-camera match
            rank_zero_warn(f"{stage}: re-ID metrics skipped: {err}")
            return
        # A few queries' rank lists (evenly spread over the query set) for the dashboard (``RankListLogger``).
        shown = torch.linspace(0, len(query[1]) - 1, min(16, len(query[1])), device=query[1].device).long()
        top, correct = rank_lists(query[0], gallery[0], query[1], gallery[1], query[2], gallery[2], shown)
        self.last_rank_lists = {"stage": stage, "queries": shown.cpu(), "gallery": top.cpu(), "correct": correct.cpu()}
        for name, value in metrics.as_dict().items():
            # Every rank computed the same numbers from the gathered features: no further reduction needed.
            self.log(f"{stage}/{name}", value, prog_bar=name in ("rank1", "mAP"))
        if stage == "test" and self.trainer.is_global_zero:
            log_cmc(self.trainer, metrics.cmc, "test/cmc")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images, pids, cams, indices = batch
        return {"features": self(images), "pids": pids, "cameras": cams, "indices": indices}

    def prediction_writer(self) -> RankListWriter:
        """``zoo predict``'s writer: ``rank_lists.csv`` of the queries (``zoo.reid.predict``)."""
        return RankListWriter()
