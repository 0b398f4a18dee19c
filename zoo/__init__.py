"""zoo: a PyTorch Lightning model zoo for computer-vision research.

Every model is a ``LightningModule`` and every dataset a ``LightningDataModule``; both are chosen by
``class_path`` in a YAML file under ``configs/`` and run through one CLI (``zoo fit|validate|test|predict``).
"""

__version__ = "0.1.0"
