"""Models used only by tests (importable by class_path because tests/ is on sys.path)."""

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from zoo.classification.classifier import ImageClassifier


class NaNAtStep(ImageClassifier):
    """An ImageClassifier whose loss turns NaN at global step ``nan_at_step``."""

    def __init__(self, *args: Any, nan_at_step: int = 7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at_step = nan_at_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_at_step else loss


class RecordEpisodes(Callback):
    """Writes each rank's episode classes to ``<out>/episodes_rank<r>.json``:
    ``{"train": [[class ids], ...], "test": [...], "world_size": n}``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.seen: dict = {"train": [], "test": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["train"].append(batch[2].tolist())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen["test"].append(batch[2].tolist())

    def on_test_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"episodes_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({**self.seen, "world_size": trainer.world_size}))


class RecordBatchLabels(Callback):
    """Writes each rank's training-batch labels to ``<out>/labels_rank<r>.json``: ``{"train": [[...], ...]}``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.seen: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch[1].tolist())

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"labels_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"train": self.seen, "world_size": trainer.world_size}))


class RecordSemiSupRank(Callback):
    """Writes ``<out>/semisup_rank<r>.json``: the labeled and unlabeled indices-by-label seen per step (the image sums,
    which identify images), each logged ``train/mpl_h``, and a checksum of every parameter and buffer at the end."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.images: list = []
        self.h: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (weak, _), _ = batch["unlabeled"]
        self.images.append([round(float(x), 4) for x in weak.flatten(1).sum(1)])
        if "train/mpl_h" in trainer.callback_metrics:
            self.h.append(float(trainer.callback_metrics["train/mpl_h"]))

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: float(v.double().sum()) for k, v in pl_module.state_dict().items()}
        path = self.out / f"semisup_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"images": self.images, "h": self.h, "state": state,
                                    "world_size": trainer.world_size}))


class RecordReIDRank(Callback):
    """Writes ``<out>/reid_rank<r>.json``: the target indices of every step, the exemplar memory's checksum and its
    first rows at the end, and (``memory_at_start``) its checksum when training starts (after a resume's restore)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.indices: list = []
        self.start_sum: float | None = None
        self.start_epoch: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_sum = float(pl_module.memory.slots.double().sum())
        self.start_epoch = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.indices.append(batch["target"][1].tolist())

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        slots = pl_module.memory.slots
        (self.out / f"reid_rank{trainer.global_rank}.json").write_text(json.dumps({
            "indices": self.indices, "memory_sum": float(slots.double().sum()),
            "memory_rows": slots[:20].tolist(), "start_sum": self.start_sum, "start_epoch": self.start_epoch,
            "world_size": trainer.world_size, "touched": int((slots.norm(dim=1) > 0).sum()),
        }))


class SignalAtStep(Callback):
    """Sends ``signal_name`` (``SIGTERM``/``SIGINT``) to this process once ``global_step`` reaches ``step``, on
    rank ``rank`` only, as a scheduler or a Ctrl-C would, in the middle of training."""

    def __init__(self, step: int = 5, signal_name: str = "SIGTERM", rank: int = 0) -> None:
        self.step, self.signal_name, self.rank, self.sent = step, signal_name, rank, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        if not self.sent and trainer.global_step >= self.step and trainer.global_rank == self.rank:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class NaNUpdateAtStep(ImageClassifier):
    """An ImageClassifier whose optimizer step that makes ``global_step == nan_at_step`` leaves a NaN in its first parameter while every
    loss stays finite until then: the case a loss check alone cannot see before the step's checkpoint is saved."""

    def __init__(self, *args: Any, nan_at_step: int = 5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at_step = nan_at_step

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.global_step + 1 == self.nan_at_step:  # Lightning counts the step after this hook returns
            with torch.no_grad():
                next(self.parameters()).view(-1)[0] = float("nan")


class SignalAtTestBatch(Callback):
    """Sends SIGTERM to this process at test batch ``batch``, as a scheduler would in the middle of ``zoo test``."""

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        import os
        import signal

        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class RecordSoftTeacherRank(Callback):
    """Writes ``<out>/soft_teacher_rank<r>.json``: the unlabelled image ids of every step, and at the first batch and
    at the end the teacher's and the student's checksums (every tensor's sum) and the teacher's update count."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.image_ids: list = []
        self.start: dict | None = None

    @staticmethod
    def _state(pl_module) -> dict:
        return {"teacher": {k: float(v.double().sum()) for k, v in pl_module.teacher.module.state_dict().items()},
                "student": {k: float(v.double().sum()) for k, v in pl_module.detector.state_dict().items()},
                "num_updates": int(pl_module.teacher.num_updates)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = self._state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.image_ids.append([int(info["image_id"]) for info in batch["unlabeled"][2]])

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"soft_teacher_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"image_ids": self.image_ids, "start": self.start, "end": self._state(pl_module),
                                    "world_size": trainer.world_size}))
