"""Image classification: the reference classifier (GAP + linear head) and class activation maps."""
