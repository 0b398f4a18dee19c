"""Detection costs, measured in one run: R-FCN against torchvision's Faster R-CNN on the same backbone, the ATSS and
GFL training steps against torchvision's FCOS on the same neck, and the ATSS assigner against a per-box loop.

1. **R-FCN vs Faster R-CNN** (``--backbone`` resnet50, random init, ``--size`` 512 × 512, batch 1, eval mode,
   ``torch.no_grad``, ``--rfcn-classes`` 20 as on VOC, where the paper times it):
   * R-FCN: ``zoo.detection.rfcn.RFCN`` on ``TimmFeatures(backbone, out_indices=[3, 4], output_stride=16)``:
     RPN on block4, the 1×1 reduction (1024) and k² (C + 1) + 4k² position-sensitive maps (k = 7) on the atrous
     block5, ``ps_roi_align`` + vote on 300 proposals (RPN 6000 → NMS 0.7 → 300), class-agnostic boxes.
   * Faster R-CNN: ``torchvision.models.detection.FasterRCNN`` whose backbone is the same timm trunk cut after
     block4 (``TimmFeatures(backbone, out_indices=[3])``, C4, stride 16: block5 is never run), the same RPN
     (anchors (128, 256, 512) × (0.5, 1, 2), 6000 → NMS 0.7 → 300 at test) and its default RoI head:
     ``MultiScaleRoIAlign`` 7×7 (sampling ratio 2) on the C4 map → ``TwoMLPHead`` (C4·7·7 → 1024 → 1024) →
     ``FastRCNNPredictor`` (C + 1 scores, 4 (C + 1) class-specific deltas). The trunk's weights and the RPN head's
     are copied from the R-FCN, so both models see the same block4 and the same 300 proposals (checked).
   Its ``GeneralizedRCNNTransform`` is bypassed by calling the parts directly (``backbone`` → ``rpn`` →
   ``roi_heads``), as ``zoo.detection.fcos.TorchvisionFCOS`` does: both models start from the same normalised
   padded tensor (``RFCN.preprocess``, not timed) and end at the final detections; the transform's
   ``postprocess`` is skipped (no resizing, so it would rescale by 1). Test-time settings are shared: score > 0.05
   (``--score-threshold``), class-wise NMS 0.3 (the paper's), 100 detections. What still differs is each model's
   own selection: R-FCN keeps the 1000 best (RoI, class) pairs above the threshold before NMS
   (``select_detections``), torchvision all of them, minus boxes under 0.01 px. With random weights the scores
   are nearly uniform (≈ 1/(C + 1)), so how many pass the threshold is luck; the counts are printed.
   Measured: (a) per-image inference, and its backbone alone (R-FCN's body runs the atrous block5 over the whole
   image, which C4 Faster R-CNN does not run at all); (b) the RoI head alone on the same 300 fixed random
   proposals (seeded, 16 px to the image side, inside the image) and the backbone maps of the same image:
   R-FCN = ``PositionSensitiveHead`` forward (reduction + PS maps over the image + ``ps_roi_align`` + vote), and
   its per-RoI part alone (``ps_roi_align`` + vote on precomputed maps); Faster R-CNN = ``box_roi_pool`` +
   ``box_head`` + ``box_predictor`` (all of it per RoI). The ratios R-FCN / Faster R-CNN are printed with the
   issue's target for the head (≤ 0.5×). The head ratio depends on the image size: R-FCN's maps cost ∝ H·W,
   Faster R-CNN's fc6 (C4·49 × 1024 per RoI: 15 GMAC for 300 RoIs on ResNet-50) does not. The paper's Faster R-CNN
   ran all of ResNet-101's conv5 per RoI (0.42 s vs R-FCN's 0.17 s per image), far heavier than torchvision's
   two-FC head, so the paper's ratio is not what this comparison can reproduce.
2. **Training step, ATSS and GFL vs torchvision FCOS**: each detector on an identical (same seed)
   ``FeaturePyramid(TimmFeatures(backbone, out_indices=[2, 3, 4]), 256, extra_levels=2)`` (P3–P7), 4-conv GN
   towers, paper defaults (``anchor_scale=8``, top-9 ATSS, GFL ``reg_max=16``), ``--dense-classes`` 80 (COCO).
   A batch of ``--batch`` 2 random ``--size`` images in [0, 1] with 5 GT boxes each (seeded; sides spread
   log-uniformly from 16 px to 90 % of the shorter image side, aspect 1:2 to 2:1, random labels). One step =
   ``preprocess`` + ``compute_losses`` + sum + backward + SGD step (lr 0.01, momentum 0.9, weight decay 1e-4 on
   weights only, ``bias_lr_factor`` as the model's hparams; ``zero_grad(set_to_none=True)`` included). After the
   timed steps, on the same batch with the head outputs precomputed (``no_grad``) and re-entered as leaves:
   ``assign`` (``model.assign``, all images) and the losses (``dense_losses`` forward + backward to the head
   outputs); for FCOS its matching (``FCOS.compute_loss`` with the head's loss stubbed out) and its losses
   (``FCOSHead.compute_loss`` forward + backward). Their share of the step is printed next to the ratios
   ATSS / FCOS and GFL / FCOS (target ≤ 1.0×).
3. **Assignment**: 100 random GT boxes (sides 16–400 px, inside an 800 × 1333 image) against one square anchor
   (side 8 strides) per location of P3–P7 for the 800 × 1344 padded image (the exact anchor count is printed):
   ``ATSSAssigner`` (vectorised over anchors × boxes, a loop over the 5 levels only) against a reference written
   here that loops over the GT boxes in Python the way per-GT implementations do (per box: IoU and centre
   distance to every anchor, per-level top-9 nearest, mean + std threshold, centre strictly inside by 0.01 px,
   then an anchor claimed by several boxes goes to the highest IoU, first box on ties). Both must give identical
   ``matched`` vectors before anything is timed. ``MaxIoUAssigner`` (RetinaNet's 0.5 / 0.4 with low-quality
   matches) on the same inputs for reference.

4. **Soft Teacher step vs the Faster R-CNN step** (``--sections softteacher``): ``zoo.detection.faster_rcnn.
   FasterRCNN`` on ``FeaturePyramid(TimmFeatures(backbone, out_indices=[1, 2, 3, 4]), 256)`` (P2–P5, mmdetection's
   settings: 512 RoIs per image, RPN 2000 → 1000), 80 classes, and ``SoftTeacher`` with the same weights. The
   supervised step trains on ``--st-images`` 5 labelled images; the Soft Teacher step on 1 labelled + 4 unlabelled
   ones (weak and strong views of the same size, the strong one translated by 10 %). A random teacher scores
   every box ≈ 1/81, so its detections are replaced, after it has run, by ``--st-boxes`` 8 planted boxes per image
   (scores in (0.5, 1), half above 0.9): a realistic load for jittering (10 copies each) and for the pseudo-box
   losses. Its parts: the supervised losses (forward + backward on the labelled image), the teacher's pass on the
   weak views (``no_grad``), box jittering alone, the unsupervised losses (forward + backward) and the EMA update.
   Then box mapping (``transform_boxes``, four corners through each box's 3×3 matrix, min/max, clip) and jittering
   (``jitter_boxes`` + ``box_uncertainty``) on 5 000 boxes over 5 images against per-box Python loops doing the same
   arithmetic; both must agree before timing.

Timing: ``--warmup`` calls, then the median of ``--steps`` timed calls (``--assign-steps`` for section 3, the
per-RoI parts and the loss split, which are cheap), ms. Peak memory is the extra memory the timed calls need on top
of what was allocated before them (model, optimiser state, inputs): on CPU the growth of the resident set
(``/proc/self/clear_refs`` resets the high-water mark ``VmHWM`` after ``malloc_trim``; Linux only); on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated, with the device
synchronised around every timed call.

The defaults (ResNet-50, 512 × 512, ``--steps 3`` after 1 warm-up) take 107 s on 2 idle cores with ``--threads 2``
(most of it the 12 training steps of about 6 s each). On shared cores use ``--threads 1``
(more threads than free cores makes every parallel op wait for a descheduled thread).

``ATSSAssigner`` computes IoUs for its k·L candidates only (the centre distances to every anchor pick them), so its
cost is one anchors × boxes distance matrix and a per-level top-k; the per-box loop does the same arithmetic one box
at a time plus about twenty small ops per box, and ``MaxIoUAssigner`` needs the full IoU matrix by definition.

    python bench/detection.py [--sections rfcn train assign softteacher] [--backbone resnet50] [--size 512 512] [--batch 2]
                              [--rfcn-classes 20] [--dense-classes 80] [--score-threshold 0.05] [--steps 3]
                              [--warmup 1] [--assign-steps 10] [--st-images 5] [--st-boxes 8]
                              [--device cuda|cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.backbones import TimmFeatures  # noqa: E402
from zoo.detection.anchors import square_anchors  # noqa: E402
from zoo.detection.assigners import NEGATIVE, ATSSAssigner, MaxIoUAssigner  # noqa: E402
from zoo.detection.atss import ATSS  # noqa: E402
from zoo.detection.fcos import TorchvisionFCOS  # noqa: E402
from zoo.detection.fpn import FeaturePyramid  # noqa: E402
from zoo.detection.gfl import GFL  # noqa: E402
from zoo.detection.boxes import transform_boxes  # noqa: E402
from zoo.detection.faster_rcnn import FasterRCNN as ZooFasterRCNN  # noqa: E402
from zoo.detection.rfcn import RFCN  # noqa: E402
from zoo.detection.soft_teacher import SoftTeacher, box_uncertainty, jitter_boxes  # noqa: E402
from measure import measure  # noqa: E402  (bench/measure.py)



def _millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_boxes(n: int, height: int, width: int, min_side: float, max_side: float, g: torch.Generator,
                 log_uniform: bool = False) -> torch.Tensor:
    """``n`` xyxy boxes inside ``height × width``; sides in ``[min_side, max_side]`` (capped by the image)."""
    if log_uniform:
        side = torch.exp(math.log(min_side) + torch.rand(n, generator=g) * math.log(max_side / min_side))
        aspect = torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(2.0))  # h / w in [1/2, 2]
        w, h = side / aspect.sqrt(), side * aspect.sqrt()
    else:
        w = min_side + torch.rand(n, generator=g) * (max_side - min_side)
        h = min_side + torch.rand(n, generator=g) * (max_side - min_side)
    w, h = w.clamp(max=width - 1.0), h.clamp(max=height - 1.0)
    x1, y1 = torch.rand(n, generator=g) * (width - w), torch.rand(n, generator=g) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |", flush=True)


# ---- 1. R-FCN vs Faster R-CNN -----------------------------------------------------------------------------------

class C4Backbone(nn.Module):
    """The timm trunk up to block4 (stride 16) as a torchvision detection backbone: ``{"0": C4}``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.body = TimmFeatures(name, out_indices=[3])
        self.out_channels: int = self.body.out_channels[0]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.body(x)[0])])


def frcnn_detect(model: FasterRCNN, images: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[dict]:
    """``GeneralizedRCNN.forward`` at test time without its transform (normalise, resize, box rescaling)."""
    features = model.backbone(images)
    image_list = ImageList(images, image_sizes)
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    return detections


def bench_rfcn(args: argparse.Namespace, device: torch.device) -> None:
    height, width = args.size
    classes = args.rfcn_classes
    print(f"\n## 1. R-FCN vs torchvision Faster R-CNN (C4), {args.backbone}, {height}×{width}, batch 1, "
          f"{classes} classes, 300 proposals, eval, no_grad")
    torch.manual_seed(0)
    rfcn = RFCN(body=TimmFeatures(args.backbone, out_indices=[3, 4], output_stride=16), num_classes=classes, k=7,
                hidden_channels=1024, anchor_sizes=(128, 256, 512), anchor_ratios=(0.5, 1.0, 2.0),
                rpn_pre_nms=6000, rpn_post_nms=300, rpn_nms_threshold=0.7, size_divisible=16,
                score_threshold=args.score_threshold, nms_threshold=0.3, max_detections=100)
    backbone = C4Backbone(args.backbone)
    missing, _ = backbone.body.load_state_dict(rfcn.body.state_dict(), strict=False)
    assert not missing, missing
    frcnn = FasterRCNN(
        backbone, num_classes=classes + 1, min_size=height, max_size=max(height, width),  # transform unused
        rpn_anchor_generator=AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=300, rpn_nms_thresh=0.7,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_score_thresh=args.score_threshold, box_nms_thresh=0.3,
        box_detections_per_img=100)
    frcnn.rpn.head.load_state_dict(rfcn.rpn.head.state_dict())
    rfcn, frcnn = rfcn.to(device).eval(), frcnn.to(device).eval()

    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, height, width, generator=g).to(device)
    with torch.no_grad():
        pixels, sizes = rfcn.preprocess([image])
        block4, block5 = rfcn.body(pixels)
        c4 = frcnn.backbone(pixels)
        _, rfcn_proposals, _ = rfcn.proposals(pixels, sizes)
        frcnn_proposals, _ = frcnn.rpn(ImageList(pixels, sizes), c4)
    same_trunk = torch.equal(block4, c4["0"])
    same_proposals = same_trunk and torch.equal(rfcn_proposals[0], frcnn_proposals[0])
    num_proposals = len(rfcn_proposals[0])

    rois_xyxy = random_boxes(300, height, width, 16, min(height, width), g).to(device)
    rois = torch.cat([rois_xyxy.new_zeros(300, 1), rois_xyxy], dim=1)
    head = rfcn.head
    with torch.no_grad():
        hidden = head.reduce(block5)
        cls_maps, box_maps = head.cls_maps(hidden), head.box_maps(hidden)
    roi_heads = frcnn.roi_heads

    def frcnn_head() -> tuple[torch.Tensor, torch.Tensor]:
        pooled = roi_heads.box_roi_pool(c4, [rois_xyxy], sizes)
        return roi_heads.box_predictor(roi_heads.box_head(pooled))

    results = {}
    with torch.no_grad():
        for key, fn, repeats in [
            ("rfcn_detect", lambda: rfcn.detect(pixels, sizes), args.steps),
            ("frcnn_detect", lambda: frcnn_detect(frcnn, pixels, sizes), args.steps),
            ("rfcn_body", lambda: rfcn.body(pixels), args.steps),
            ("frcnn_body", lambda: frcnn.backbone(pixels), args.steps),
            ("rfcn_head", lambda: head(block5, rois), args.steps),
            ("frcnn_head", frcnn_head, args.steps),
            ("rfcn_vote", lambda: (head.vote(cls_maps, rois), head.vote(box_maps, rois)), args.assign_steps),
        ]:
            results[key] = measure(fn, repeats, device, args.warmup)
    rfcn_dets, frcnn_dets = len(results["rfcn_detect"][2][0]["boxes"]), len(results["frcnn_detect"][2][0]["boxes"])

    def ms(key: str) -> float:
        return results[key][0]

    def mib(key: str) -> float:
        return results[key][1]

    frcnn_head_params = _millions(roi_heads.box_head) + _millions(roi_heads.box_predictor)
    rows = [
        ["inference per image, ms", f"{ms('rfcn_detect'):.1f}", f"{ms('frcnn_detect'):.1f}",
         f"{ms('rfcn_detect') / ms('frcnn_detect'):.2f}×", ""],
        ["  peak extra MiB", f"{mib('rfcn_detect'):.0f}", f"{mib('frcnn_detect'):.0f}", "", ""],
        ["  of which backbone, ms (block4+5 / C4)", f"{ms('rfcn_body'):.1f}", f"{ms('frcnn_body'):.1f}",
         f"{ms('rfcn_body') / ms('frcnn_body'):.2f}×", ""],
        ["RoI head, 300 RoIs, ms", f"{ms('rfcn_head'):.1f}", f"{ms('frcnn_head'):.1f}",
         f"{ms('rfcn_head') / ms('frcnn_head'):.2f}×", "≤ 0.5×"],
        ["  peak extra MiB", f"{mib('rfcn_head'):.0f}", f"{mib('frcnn_head'):.0f}", "", ""],
        ["  per-RoI part, ms (ps_roi_align+vote / whole head)", f"{ms('rfcn_vote'):.2f}", f"{ms('frcnn_head'):.1f}",
         f"{ms('rfcn_vote') / ms('frcnn_head'):.3f}×", ""],
        ["parameters, M (whole model)", f"{_millions(rfcn):.1f}", f"{_millions(frcnn):.1f}", "", ""],
        ["parameters, M (RoI head)", f"{_millions(head):.1f}", f"{frcnn_head_params:.1f}", "", ""],
        ["proposals / detections (score > " + f"{args.score_threshold:g})", f"{num_proposals} / {rfcn_dets}",
         f"{len(frcnn_proposals[0])} / {frcnn_dets}", "", ""],
    ]
    _table(["", "R-FCN", "Faster R-CNN", "R-FCN / FRCNN", "target"], rows)
    verdict = "met" if ms("rfcn_head") <= 0.5 * ms("frcnn_head") else "NOT met"
    print(f"same block4: {'yes' if same_trunk else 'NO'}, same proposals: {'yes' if same_proposals else 'NO'}; "
          f"head target (≤ 0.5×) {verdict}")


# ---- 2. training step --------------------------------------------------------------------------------------------

def dense_neck(backbone: str) -> FeaturePyramid:
    torch.manual_seed(0)  # the same neck weights for every detector
    return FeaturePyramid(TimmFeatures(backbone, out_indices=[2, 3, 4]), 256, extra_levels=2)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """``DetectionModule.configure_optimizers``' SGD without its schedule (which needs a trainer)."""
    hp = model.hparams
    weights, biases = [], []
    for p in model.parameters():
        if p.requires_grad:
            (biases if p.ndim <= 1 else weights).append(p)
    return torch.optim.SGD([{"params": weights, "lr": hp.lr, "weight_decay": hp.weight_decay},
                            {"params": biases, "lr": hp.lr * hp.bias_lr_factor, "weight_decay": 0.0}],
                           lr=hp.lr, momentum=hp.momentum)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: list[torch.Tensor],
               targets: list[dict[str, torch.Tensor]]) -> float:
    pixels, sizes = model.preprocess(images)
    loss = sum(model.compute_losses(pixels, sizes, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().requires_grad_(True)


def loss_split(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
               repeats: int, device: torch.device) -> tuple[float, float]:
    """(assignment ms, losses forward + backward ms) on the head outputs of this batch."""
    with torch.no_grad():
        pixels, sizes = model.preprocess(images)
    if isinstance(model, TorchvisionFCOS):
        with torch.no_grad():
            head_outputs, anchors, num_per_level, _ = model._forward(pixels, sizes)
        fcos, head = model.model, model.model.head
        captured: list = []
        head.compute_loss = lambda t, h, a, matched: captured.append(matched) or {}  # matching only
        try:
            match_ms, _, _ = measure(lambda: fcos.compute_loss(targets, head_outputs, anchors, num_per_level),
                                     repeats, device, 1)
        finally:
            del head.compute_loss
        matched = captured[-1]

        def losses() -> float:
            out = head.compute_loss(targets, {k: _leaf(v) for k, v in head_outputs.items()}, anchors, matched)
            total = sum(out.values())
            total.backward()
            return total.item()

        loss_ms, _, _ = measure(losses, repeats, device, 1)
        return match_ms, loss_ms
    with torch.no_grad():
        cls, reg, ctr, anchors = model(pixels)
    assign_ms, _, (matched, gt_boxes, gt_labels) = measure(lambda: model.assign(anchors, targets), repeats, device, 1)

    def losses() -> float:
        out = model.dense_losses(_leaf(cls), _leaf(reg), _leaf(ctr), anchors, matched, gt_boxes, gt_labels)
        total = sum(out.values())
        total.backward()
        return total.item()

    loss_ms, _, _ = measure(losses, repeats, device, 1)
    return assign_ms, loss_ms


def bench_train_one(name: str, build: Callable[[], nn.Module], images: list[torch.Tensor],
                    targets: list[dict[str, torch.Tensor]], args: argparse.Namespace, device: torch.device) -> dict:
    model = build().to(device).train()
    optimizer = sgd(model)
    step_ms, step_mib, loss = measure(lambda: train_step(model, optimizer, images, targets), args.steps, device,
                                      args.warmup)
    assert math.isfinite(loss), (name, loss)
    assign_ms, loss_ms = loss_split(model, images, targets, args.assign_steps, device)
    return dict(ms=step_ms, mib=step_mib, assign=assign_ms, loss=loss_ms, params=_millions(model))


def bench_train(args: argparse.Namespace, device: torch.device) -> None:
    height, width = args.size
    classes = args.dense_classes
    print(f"\n## 2. Training step (preprocess + compute_losses + backward + SGD), {args.backbone} + FPN P3–P7 256, "
          f"4-conv GN towers, batch {args.batch} × {height}×{width}, 5 GT boxes per image, {classes} classes")
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, height, width, generator=g).to(device) for _ in range(args.batch)]
    targets = [{"boxes": random_boxes(5, height, width, 16, 0.9 * min(height, width), g, log_uniform=True).to(device),
                "labels": torch.randint(0, classes, (5,), generator=g).to(device)} for _ in range(args.batch)]
    builders = {
        "FCOS (torchvision)": lambda: TorchvisionFCOS(neck=dense_neck(args.backbone), num_classes=classes, num_convs=4),
        "ATSS": lambda: ATSS(neck=dense_neck(args.backbone), num_classes=classes, num_convs=4, anchor_scale=8.0),
        "GFL": lambda: GFL(neck=dense_neck(args.backbone), num_classes=classes, reg_max=16, num_convs=4, anchor_scale=8.0),
    }
    results = {}
    for name, build in builders.items():
        results[name] = bench_train_one(name, build, images, targets, args, device)
        _release(device)  # the model and its optimiser are gone with bench_train_one's frame
    base = results["FCOS (torchvision)"]
    rows = []
    for name, r in results.items():
        share = (r["assign"] + r["loss"]) / r["ms"]
        is_base = r is base
        rows.append([name, f"{r['params']:.1f}", f"{r['ms']:.0f}", f"{r['mib']:.0f}", f"{r['assign']:.1f}",
                     f"{r['loss']:.1f}", f"{100 * share:.1f} %",
                     "1.00×" if is_base else f"{r['ms'] / base['ms']:.2f}×",
                     "" if is_base else f"{r['mib'] / max(base['mib'], 1e-9):.2f}×", "" if is_base else "≤ 1.0×"])
    _table(["model", "params M", "ms/step", "peak MiB", "assign ms", "losses ms (fwd+bwd)", "assign+losses share",
            "time / FCOS", "memory / FCOS", "target"], rows)
    print("FCOS's assign = its matching (FCOS.compute_loss with the head's loss stubbed), its losses = "
          "FCOSHead.compute_loss; all on this batch's head outputs")


# ---- 3. assignment -----------------------------------------------------------------------------------------------

def atss_per_box(anchors: torch.Tensor, num_per_level: list[int], gt_boxes: torch.Tensor, topk: int = 9,
                 min_inside: float = 0.01) -> torch.Tensor:
    """ATSS (Zhang et al. 2020, Algorithm 1) with a Python loop over the GT boxes: ``matched (A,)``."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    best_iou = anchors.new_full((len(anchors),), -1.0)
    matched = torch.full((len(anchors),), NEGATIVE, dtype=torch.long, device=anchors.device)
    for g, box in enumerate(gt_boxes):
        ious = box_iou(anchors, box[None])[:, 0]
        distances = torch.cdist(centers, ((box[:2] + box[2:]) / 2)[None])[:, 0]
        candidates, start = [], 0
        for count in num_per_level:
            k = min(topk, count)
            if k > 0:
                candidates.append(distances[start:start + count].topk(k, largest=False).indices + start)
            start += count
        candidates = torch.cat(candidates)
        candidate_ious = ious[candidates]
        spread = candidate_ious.std() if len(candidates) > 1 else candidate_ious.new_zeros(())
        threshold = candidate_ious.mean() + spread
        c = centers[candidates]
        inside = torch.stack([c[:, 0] - box[0], c[:, 1] - box[1], box[2] - c[:, 0], box[3] - c[:, 1]],
                             dim=1).min(dim=1).values > min_inside
        positive = candidates[(candidate_ious >= threshold) & inside]
        better = positive[ious[positive] > best_iou[positive]]  # strict: an earlier box keeps a tie
        best_iou[better] = ious[better]
        matched[better] = g
    return matched


def bench_assign(args: argparse.Namespace, device: torch.device) -> None:
    height, width, num_gt = 800, 1333, 100
    strides = [8, 16, 32, 64, 128]
    padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32  # the dense detectors' size_divisible
    sizes, h, w = [], -(-padded_h // 8), -(-padded_w // 8)
    for _ in strides:  # stride-2 3×3 convs (padding 1): ⌈s / 2⌉ per level
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    anchors = square_anchors(sizes, strides, 8.0, device)
    g = torch.Generator().manual_seed(3)
    gt = random_boxes(num_gt, height, width, 16, 400, g).to(device)
    num_anchors = len(anchors.boxes)
    print(f"\n## 3. Assignment: {num_gt} GT boxes (16–400 px in {height}×{width}) vs {num_anchors} anchors "
          f"(P3–P7 of {padded_h}×{padded_w}: {' + '.join(f'{a}×{b}' for a, b in sizes)}), one per location, "
          f"side 8 strides, top-9")
    atss = ATSSAssigner(9)
    with torch.no_grad():
        vectorised = atss(anchors.boxes, anchors.num_per_level, gt)
        reference = atss_per_box(anchors.boxes, anchors.num_per_level, gt)
        assert torch.equal(vectorised, reference), \
            f"{int((vectorised != reference).sum())} of {num_anchors} anchors differ"
        rows_in = [("ATSSAssigner (vectorised)", lambda: atss(anchors.boxes, anchors.num_per_level, gt)),
                   ("ATSS, loop over GT boxes", lambda: atss_per_box(anchors.boxes, anchors.num_per_level, gt)),
                   ("MaxIoUAssigner (0.5 / 0.4)", lambda: MaxIoUAssigner()(anchors.boxes, anchors.num_per_level, gt))]
        results = [(name, *measure(fn, args.assign_steps, device, args.warmup)) for name, fn in rows_in]
    loop_ms = results[1][1]
    rows = [[name, f"{ms:.1f}", f"{mib:.0f}", str(int((out >= 0).sum())), f"{loop_ms / ms:.1f}×"]
            for name, ms, mib, out in results]
    _table(["assigner", "ms", "peak extra MiB", "positive anchors", "speed-up vs loop"], rows)
    print(f"identical matched vectors (vectorised vs loop): yes ({int((vectorised >= 0).sum())} positives, "
          f"{len(vectorised.unique()) - 1} of {num_gt} boxes matched)")


# ---- 4. Soft Teacher vs Faster R-CNN ----------------------------------------------------------------------------

def _two_stage(cls: type, backbone: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)  # the same weights for both
    neck = FeaturePyramid(TimmFeatures(backbone, out_indices=[1, 2, 3, 4]), 256)
    return cls(neck=neck, num_classes=80, **kwargs)


def _planted_detect(real: Callable, boxes_per_image: int, generator: torch.Generator) -> Callable:
    """The teacher's ``detect``, run for its cost, then replaced by planted boxes (a random teacher finds none)."""
    def detect(images, image_sizes, features=None):
        real(images, image_sizes, features)
        out = []
        for height, width in image_sizes:
            boxes = random_boxes(boxes_per_image, height, width, 24, min(height, width) * 0.6, generator)
            boxes = boxes.to(images.device)
            scores = torch.linspace(0.55, 0.99, boxes_per_image, device=images.device)
            out.append({"boxes": boxes, "scores": scores,
                        "labels": torch.randint(80, (boxes_per_image,), generator=generator).to(images.device)})
        return out
    return detect


def map_boxes_per_box(boxes: torch.Tensor, matrices: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Reference: ``transform_boxes`` one box at a time, as per-image / per-box implementations loop."""
    out = []
    for box, matrix, (height, width) in zip(boxes.tolist(), matrices.tolist(), sizes.tolist()):
        xs, ys = [], []
        for x, y in ((box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])):
            u = matrix[0][0] * x + matrix[0][1] * y + matrix[0][2]
            v = matrix[1][0] * x + matrix[1][1] * y + matrix[1][2]
            w = matrix[2][0] * x + matrix[2][1] * y + matrix[2][2]
            xs.append(u / w)
            ys.append(v / w)
        out.append([min(max(min(xs), 0), width), min(max(min(ys), 0), height), min(max(max(xs), 0), width),
                    min(max(max(ys), 0), height)])
    return torch.tensor(out, dtype=boxes.dtype)


def uncertainty_per_box(refined: torch.Tensor) -> torch.Tensor:
    """Reference: ``box_uncertainty`` one box at a time."""
    out = []
    for copies in refined.transpose(0, 1):
        mean = copies.mean(dim=0)
        sides = (mean[2:] - mean[:2]).clamp(min=1).repeat(2)
        out.append((copies.std(dim=0) / sides).mean())
    return torch.stack(out)


def bench_soft_teacher(args: argparse.Namespace, device: torch.device) -> None:
    height, width = args.size
    count = args.st_images
    print(f"\n## 4. Soft Teacher vs Faster R-CNN training step, {args.backbone} + FPN P2–P5 256, {height}×{width}, "
          f"{count} images ({count} labelled vs 1 labelled + {count - 1} unlabelled), {args.st_boxes} planted "
          "pseudo boxes per unlabelled image")
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=g).to(device) for _ in range(count)]
    targets = [{"boxes": random_boxes(5, height, width, 16, 0.9 * min(height, width), g, log_uniform=True).to(device),
                "labels": torch.randint(80, (5,), generator=g).to(device)} for _ in range(count)]
    shift = torch.tensor([[1.0, 0, 0.1 * width], [0, 1, 0.1 * height], [0, 0, 1]], dtype=torch.float64)
    strong = [torch.roll(im, shifts=(int(0.1 * height), int(0.1 * width)), dims=(-2, -1)) for im in images[1:]]
    infos = [{"weak_matrix": torch.eye(3, dtype=torch.float64), "strong_matrix": shift, "image_id": torch.tensor(i),
              "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for i in range(count - 1)]

    supervised = _two_stage(ZooFasterRCNN, args.backbone).to(device).train()
    optimizer = sgd(supervised)
    sup_ms, sup_mib, _ = measure(lambda: train_step(supervised, optimizer, images, targets), args.steps, device,
                                 args.warmup)
    supervised = optimizer = None  # freed before the Soft Teacher model is built
    _release(device)

    model = _two_stage(SoftTeacher, args.backbone).to(device).train()
    teacher = model.teacher_network
    teacher.detect = _planted_detect(teacher.detect, args.st_boxes, g)
    optimizer = sgd(model)
    batch = {"labeled": (images[:1], [dict(t, iscrowd=torch.zeros(5, dtype=torch.bool)) for t in targets[:1]]),
             "unlabeled": (images[1:], strong, infos)}

    def st_step() -> float:
        loss = model.training_step(batch, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.teacher.update(model.detector)
        return loss.item()

    model.log = model.log_dict = lambda *a, **k: None  # no trainer here
    st_ms, st_mib, loss = measure(st_step, args.steps, device, args.warmup)
    assert math.isfinite(loss)

    def supervised_part() -> None:
        pixels, sizes = model.preprocess(images[:1])
        sum(model.detector.supervised_losses(pixels, sizes, targets[:1]).values()).backward()

    sup_part_ms, _, _ = measure(supervised_part, args.assign_steps, device, 1)
    model.hparams.box_jittering = False
    teacher_ms, _, _ = measure(lambda: model.pseudo_label(images[1:]), args.assign_steps, device, 1)
    model.hparams.box_jittering = True
    pseudo = model.pseudo_label(images[1:])
    counts = torch.bincount(pseudo.image, minlength=count - 1)
    jitter_ms, _, _ = measure(lambda: model.jitter_uncertainty(pseudo.features, pseudo.sizes, pseudo.boxes,
                                                               pseudo.labels, pseudo.image, counts),
                              args.assign_steps, device, 1)
    unsup_ms, _, _ = measure(lambda: sum(model.unsupervised_losses(strong, infos, pseudo).values()).backward(),
                             args.assign_steps, device, 1)
    ema_ms, _, _ = measure(lambda: model.teacher.update(model.detector), args.assign_steps, device, 1)
    rows = [["Faster R-CNN step", f"{sup_ms:.0f}", f"{sup_mib:.0f}", "1.00×"],
            ["Soft Teacher step", f"{st_ms:.0f}", f"{st_mib:.0f}", f"{st_ms / sup_ms:.2f}×"],
            ["  supervised losses, 1 labelled image (fwd + bwd)", f"{sup_part_ms:.0f}", "",
             f"{sup_part_ms / st_ms:.0%}"],
            ["  teacher on the weak views (no_grad)", f"{teacher_ms:.0f}", "", f"{teacher_ms / st_ms:.0%}"],
            ["  box jittering (10 copies, teacher box head)", f"{jitter_ms:.0f}", "", f"{jitter_ms / st_ms:.0%}"],
            ["  unsupervised losses (fwd + bwd)", f"{unsup_ms:.0f}", "", f"{unsup_ms / st_ms:.0%}"],
            ["  EMA update", f"{ema_ms:.1f}", "", f"{ema_ms / st_ms:.1%}"]]
    _table(["step (ms, peak MiB, ratio or share of the Soft Teacher step)", "ms", "peak MiB", "ratio / share"], rows)
    model = optimizer = pseudo = None
    _release(device)

    n = 5000
    boxes = random_boxes(n, height, width, 8, 300, g).double()
    image = torch.randint(5, (n,), generator=g)
    angles = torch.rand(5, generator=g) * 0.5
    matrices = torch.eye(3, dtype=torch.float64).repeat(5, 1, 1)
    matrices[:, 0, 0], matrices[:, 0, 1] = angles.cos(), -angles.sin()
    matrices[:, 1, 0], matrices[:, 1, 1] = angles.sin(), angles.cos()
    matrices[:, :2, 2] = torch.rand(5, 2, generator=g).double() * 50
    sizes = torch.tensor([[height, width]]).repeat(5, 1)
    vector_ms, _, mapped = measure(lambda: transform_boxes(boxes, matrices[image], sizes[image]), args.assign_steps,
                                   torch.device("cpu"), 1)
    loop_ms, _, reference = measure(lambda: map_boxes_per_box(boxes, matrices[image], sizes[image]), 2,
                                    torch.device("cpu"), 0)
    assert torch.allclose(mapped, reference, atol=1e-6)
    refined = jitter_boxes(boxes.float(), 10, 0.06, g)
    jit_ms, _, unc = measure(lambda: box_uncertainty(jitter_boxes(boxes.float(), 10, 0.06, g)), args.assign_steps,
                             torch.device("cpu"), 1)
    unc_loop_ms, _, unc_ref = measure(lambda: uncertainty_per_box(refined), 2, torch.device("cpu"), 0)
    assert torch.allclose(box_uncertainty(refined), unc_ref, atol=1e-6)
    _table([f"{n} boxes over 5 images (CPU)", "vectorised ms", "per-box loop ms", "speed-up"],
           [["map through 3×3 matrices + clip", f"{vector_ms:.2f}", f"{loop_ms:.0f}", f"{loop_ms / vector_ms:.0f}×"],
            ["jitter (10 copies) + uncertainty", f"{jit_ms:.2f}", f"{unc_loop_ms:.0f} (uncertainty only)",
             f"{unc_loop_ms / jit_ms:.0f}×"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=["rfcn", "train", "assign", "softteacher"],
                        default=["rfcn", "train", "assign", "softteacher"])
    parser.add_argument("--backbone", default="resnet50", help="timm ResNet name (random init)")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2, help="training-step batch")
    parser.add_argument("--rfcn-classes", type=int, default=20, help="R-FCN / Faster R-CNN classes (VOC: 20)")
    parser.add_argument("--dense-classes", type=int, default=80, help="ATSS / GFL / FCOS classes (COCO: 80)")
    parser.add_argument("--score-threshold", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--assign-steps", type=int, default=10, help="timed calls of the cheap parts")
    parser.add_argument("--st-images", type=int, default=5, help="Soft Teacher: 1 labelled + N-1 unlabelled")
    parser.add_argument("--st-boxes", type=int, default=8, help="Soft Teacher: planted pseudo boxes per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{datetime.datetime.now().isoformat(timespec='minutes')}, device {device} ({where}), torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")
    print(f"median of {args.steps} after {args.warmup} warm-up ({args.assign_steps} for the cheap parts); "
          "peak = extra memory during the timed calls")
    start = time.perf_counter()
    for section, bench in [("rfcn", bench_rfcn), ("train", bench_train), ("assign", bench_assign),
                           ("softteacher", bench_soft_teacher)]:
        if section in args.sections:
            bench(args, device)
            _release(device)  # each section's models and tensors die with its frame
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
