"""Few-shot data: episodic (N-way, K-shot, Q-query) loading of Omniglot, the CloserLook json splits and glyphs.

* ``episodes``: the episode contract (``Episode``, ``EpisodeSetting``), ``EpisodicBatchSampler`` and
  ``EpisodeCollate``;
* ``datamodules``: ``FewShotDataModule`` and the formats (``OmniglotDataModule``, ``CloserLookDataModule``) and the
  embedded default ``GlyphsDataModule``; ``FolderEpisode``, the one episode ``zoo predict`` builds from a
  ``predict_dir`` (``PREDICT_LAYOUT``).
"""

from datamodules.fewshot.datamodules import (PREDICT_LAYOUT, CloserLookDataModule, FewShotDataModule,
                                             FewShotImageDataset, FolderEpisode, GlyphsDataModule, OmniglotDataModule)
from datamodules.fewshot.episodes import Episode, EpisodeCollate, EpisodeSetting, EpisodicBatchSampler

__all__ = [
    "Episode", "EpisodeSetting", "EpisodicBatchSampler", "EpisodeCollate", "FewShotImageDataset", "FewShotDataModule",
    "OmniglotDataModule", "CloserLookDataModule", "GlyphsDataModule", "FolderEpisode", "PREDICT_LAYOUT",
]
