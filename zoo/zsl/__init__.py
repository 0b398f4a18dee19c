"""Zero-shot learning on pre-extracted features (xlsa17): Bi-VAEGAN, f-VAEGAN and an attribute-regression baseline."""
