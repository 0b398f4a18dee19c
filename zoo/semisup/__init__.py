"""Semi-supervised classification: UDA, Meta Pseudo Labels, Entropy Minimization and the supervised-only baseline."""
