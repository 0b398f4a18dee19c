"""Continual learning: class-incremental task sequences (FACIL's protocol), LwF, EWC and ANCL."""
