"""LightningDataModules of the zoo, one module per family (mirroring ``zoo/``).

Every loader reads the real dataset's on-disk format and, when the data is missing, fails in ``setup`` with a
message naming the path, the expected layout and how to get the data. The embedded defaults (digits and data
generated from it) need no download.
"""
