"""Object-detection data: COCO and Pascal VOC in their real formats, and an embedded procedural default.

Every dataset returns ``(image, target)``: ``image`` a float32 ``(3, H, W)`` RGB tensor in [0, 1] (not normalised;
grayscale files become RGB) and ``target`` a dict

    boxes      float32 (N, 4)  xyxy pixels of the transformed image, clamped to it, degenerate boxes removed
    labels     int64   (N,)    contiguous class ids 0..C-1
    iscrowd    bool    (N,)    COCO ``iscrowd=1`` / VOC ``difficult=1``: not trained on, ignored by evaluation
    image_id   int64   ()      COCO image id; VOC: the index in the (concatenated) split
    orig_size  int64   (2,)    (h, w) of the image file, before resizing: predictions are rescaled to it

``detection_collate`` keeps the variable sizes: a batch is ``(list of images, list of targets)``; models pad.

On-disk formats:

    COCO (cocodataset.org)                               Pascal VOC (host.robots.ox.ac.uk/pascal/VOC)
    <root>/train2017/000000000009.jpg                    <root>/VOC2007/Annotations/000005.xml
    <root>/val2017/000000000139.jpg                      <root>/VOC2007/JPEGImages/000005.jpg
    <root>/annotations/instances_{train,val}2017.json    <root>/VOC2007/ImageSets/Main/{trainval,test}.txt

COCO boxes are ``[x, y, width, height]``; the sparse category ids (1..90) become labels 0..79 in sorted-id order
(``category_ids`` maps back). VOC boxes are 1-based pixel indices; they become ``x1 = xmin - 1 ... x2 = xmax - 1``
as in py-faster-rcnn, and the classes are the 20 standard ones in the standard order (``VOC_CLASSES``).

Transforms (``detection_transform``): training resizes the shorter side to a size drawn from ``train_min_size``
(multi-scale when a list) with the longer side capped at ``max_size``, then flips horizontally with ``flip_prob``;
evaluation resizes the shorter side to ``min_size`` (longer side capped). Both clamp the boxes to the image and drop
the degenerate ones (together with their labels and ``iscrowd``). A resize to the size an image already has is
skipped. ``zoo predict`` on a folder (``predict_dir``) reads each file as RGB and resizes it as evaluation does
(``image_transform``); its batches are ``image_file_collate``'s dicts with the files' original sizes.

Training batches hold only landscape (w ≥ h) or only portrait images (``AspectRatioBatchSampler``, as torchvision's
``GroupedBatchSampler``), so little padding is wasted; the DataModules shard training and evaluation across DDP ranks
themselves (configs set ``trainer.use_distributed_sampler: false``).

Semi-supervised detection (Soft Teacher) reads partially labelled COCO and the digit canvases with 5 % labelled
(``datamodules.detection.semi``): labelled batches plus weak/strong views of unlabelled images with their 3×3
transform matrices.

``DigitCanvasDataModule`` is the embedded default: ``write_digit_canvas`` pastes scikit-learn's bundled 8×8 digits on
noisy canvases and writes them as a real COCO-format set, which is then read by the same ``CocoDetection`` code.
"""

from datamodules.detection.coco import COCO_LAYOUT, CocoDetection, parse_coco
from datamodules.detection.datamodules import (CocoDetectionDataModule, DetectionDataModule, DigitCanvasDataModule,
                                               VOCDetectionDataModule)
from datamodules.detection.records import DetectionDataset, DetectionRecords
from datamodules.detection.sampler import AspectRatioBatchSampler
from datamodules.detection.transforms import (ResizeShortestSide, detection_collate, detection_transform,
                                              image_file_collate, image_transform)
from datamodules.detection.semi import (AugmentedView, DigitCanvasSemiSupervisedDataModule,
                                        SemiSupervisedDetectionDataModule, UnlabeledViews, partial_label_ids,
                                        read_split_ids)
from datamodules.detection.voc import VOC_CLASSES, VOC_LAYOUT, VOCDetection

__all__ = [
    "VOC_CLASSES", "COCO_LAYOUT", "VOC_LAYOUT", "DetectionRecords", "DetectionDataset", "parse_coco", "CocoDetection",
    "VOCDetection", "ResizeShortestSide", "detection_transform", "detection_collate", "image_transform",
    "image_file_collate", "AspectRatioBatchSampler",
    "DetectionDataModule", "CocoDetectionDataModule", "VOCDetectionDataModule", "DigitCanvasDataModule",
    "AugmentedView", "UnlabeledViews", "partial_label_ids", "read_split_ids", "SemiSupervisedDetectionDataModule",
    "DigitCanvasSemiSupervisedDataModule",
]
