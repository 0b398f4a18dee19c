"""Data sets the zoo generates, so that every family runs without a download: one module per set, named after the
family it serves, each writing the set in the on-disk format of the real data set it stands in for (so the family's
real loader reads it unchanged).

Every generator installs its set through ``install.install_generated``: the set owns its folder ``root``, whose
``generated.json`` marker (generator, version, parameters) is written last, so a set is complete exactly when its
marker matches. A matching set is never rewritten, an outdated one of the same generator is replaced, and a
non-empty folder without such a marker is refused (never deleted). Sets are written into a uniquely named staging
folder next to ``root`` and renamed into place, so readers and concurrent writers never see a half-written set.

| module | family | stands in for | written by |
|---|---|---|---|
| ``fewshot_glyphs`` | few-shot | Omniglot (``images_background/``, ``images_evaluation/``) | ``write_glyph_omniglot`` |
| ``finegrained_toybirds`` | fine-grained | CUB-200-2011 (``CUB_200_2011/``) | ``write_toy_birds`` |
| ``reid_toypeople`` | person re-ID | two Market-1501 domains with CamStyle fakes | ``write_synthetic_reid`` |
| ``gan_digit_domains`` | unpaired translation | CycleGAN's ``trainA/trainB/testA/testB`` | ``write_digit_domains`` |
| ``detection_digit_canvas`` | detection | COCO (images + ``instances_*.json``) | ``write_digit_canvas`` |

All of them start from scikit-learn's bundled digits or from procedural drawings; none downloads anything.
"""
