"""Unpaired image-to-image translation: U-GAT-IT and NICE-GAN, with KID and content-preservation evaluation."""
