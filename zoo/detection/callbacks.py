"""What the detection runs show on the dashboard: predicted and true boxes on a fixed set of validation images."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import draw_bounding_boxes

from zoo.callbacks import ImageLogger, log_images

__all__ = ["DetectionSamples"]


class DetectionSamples(ImageLogger):
    """After validation (``zoo.callbacks.ImageLogger``'s cadence) and test: the first ``num_images`` validation images with the
    ground truth (green) and the detections scoring at least ``min_score`` (red, with class and score).

    On W&B the boxes are also sent as interactive ``wandb.Image`` box layers (ground truth and predictions, with a
    score slider); other loggers get the drawn images, and a run without a logger a PNG under its root dir.
    """

    def __init__(self, num_images: int = 8, min_score: float = 0.3, every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.num_images, self.min_score = num_images, min_score

    def draw(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "val_set", None) if datamodule is not None else None
        if dataset is None or len(dataset) == 0:
            return
        items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        images = [image.to(pl_module.device) for image, _ in items]
        detections = pl_module.predict_images(images)
        names = list(getattr(datamodule, "class_names", [])) or [str(i) for i in range(pl_module.hparams.num_classes)]
        drawn, captions = [], []
        for image, (_, target), det in zip(images, items, detections):
            keep = det["scores"] >= self.min_score
            canvas = (image.cpu().clamp(0, 1) * 255).to(torch.uint8)
            canvas = draw_bounding_boxes(canvas, target["boxes"], colors="lime", width=1)
            labels = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(det["labels"][keep], det["scores"][keep])]
            canvas = draw_bounding_boxes(canvas, det["boxes"][keep].cpu(), labels=labels, colors="red", width=1)
            drawn.append(canvas.float() / 255)
            captions.append(f"image {int(target['image_id'])}: {int(keep.sum())} detections ≥ {self.min_score}, "
                            f"{len(target['boxes'])} true boxes")
        height = max(x.shape[1] for x in drawn)
        width = max(x.shape[2] for x in drawn)
        grid = torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[2], 0, height - x.shape[1])) for x in drawn])
        log_images(trainer, f"{stage}/detections", grid, captions,
                   png_name=f"detections/{stage}_epoch{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb_boxes(logger, stage, images, items, detections, names, trainer.global_step)

    @staticmethod
    def _wandb_boxes(logger: WandbLogger, stage: str, images: list, items: list, detections: list, names: list[str],
                     step: int) -> None:
        import wandb

        class_labels = dict(enumerate(names))

        def layer(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None) -> dict:
            rows = []
            for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
                row = {"position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]}, "domain": "pixel",
                       "class_id": int(label), "box_caption": names[int(label)]}
                if scores is not None:
                    row["scores"] = {"score": float(scores[i])}
                rows.append(row)
            return {"box_data": rows, "class_labels": class_labels}

        pictures = []
        for image, (_, target), det in zip(images, items, detections):
            array = (image.cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            pictures.append(wandb.Image(array, boxes={
                "ground_truth": layer(target["boxes"], target["labels"], None),
                "predictions": layer(det["boxes"].cpu(), det["labels"].cpu(), det["scores"].cpu())}))
        # As WandbLogger.log_metrics does: the trainer step as a metric, not W&B's own (monotonic) step counter.
        logger.experiment.log({f"{stage}/detection_boxes": pictures, "trainer/global_step": step})
