"""Fine-grained classification: API-Net."""
