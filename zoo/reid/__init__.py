"""Person re-identification: ECN (exemplar memory, domain adaptation) and the CMC/mAP evaluation."""
