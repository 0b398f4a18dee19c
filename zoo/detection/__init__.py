"""Object detection: R-FCN, ATSS and GFL on one core (FPN, anchors, assigners, heads, losses, COCO/VOC metrics)."""
