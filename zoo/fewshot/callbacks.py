"""Test-time companions of the few-shot methods: baselines measured on the very same episodes, and episode images.

``EpisodeBaselines`` scores every test episode with nearest class mean on raw pixels and on a randomly initialised
copy of the model's backbone, and logs ``test/baseline_pixels_acc_<setting>`` and
``test/baseline_random_acc_<setting>`` (with their 95 % CIs) beside ``test/acc_<setting>``: a trained method has to
beat both by more than the confidence interval to show it learned something transferable.

``EpisodeImageLogger`` logs the first test episodes of each setting as an image grid: one row per class, its support
images, then its queries framed green (correct) or red (wrong).

``EpisodePredictionWriter`` is the family's ``zoo predict`` writer: per-query rows and a per-setting summary on the
test episodes, or one's own query images classified against one's own support folders (``predict_dir``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid

from zoo.callbacks import log_images
from zoo.fewshot.episodic import EpisodeAccuracies, episode_accuracy, mean_ci95, parse_setting, query_targets
from zoo.fewshot.protonet import prototypes, squared_euclidean_logits
from zoo.predict import PredictionWriter, write_csv

__all__ = ["nearest_class_mean_logits", "EpisodeBaselines", "EpisodeImageLogger", "EpisodePredictionWriter"]


def nearest_class_mean_logits(support_features: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
    """Nearest class mean with Euclidean distance: support ``(N, K, D)``, query ``(M, D)`` → ``(M, N)``."""
    return squared_euclidean_logits(query_features, prototypes(support_features))


class EpisodeBaselines(Callback):
    """Nearest class mean on raw pixels and on a randomly initialised backbone, on the test episodes.

    Args:
        random_seed: seed of the random backbone's initialisation.
    """

    def __init__(self, random_seed: int = 0) -> None:
        self.random_seed = random_seed
        self.random_backbone: torch.nn.Module | None = None
        self.results: dict[str, dict[str, EpisodeAccuracies]] = {}

    def on_test_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_seed)
            backbone = copy.deepcopy(pl_module.backbone)
            for m in backbone.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.random_backbone = backbone.eval()
        self.results = {}

    def on_test_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        support, query, _ = batch
        n_way, k_shot = support.shape[:2]
        setting = f"{n_way}way{k_shot}shot"
        targets = query_targets(n_way, query.shape[1], support.device)
        episode = pl_module.global_rank + batch_idx * trainer.world_size
        with torch.no_grad():
            images = torch.cat([support.flatten(0, 1), query.flatten(0, 1)])
            for name, features in (("pixels", images.flatten(1)), ("random", self.random_backbone(images).flatten(1))):
                logits = nearest_class_mean_logits(features[: n_way * k_shot].view(n_way, k_shot, -1),
                                                   features[n_way * k_shot :])
                store = self.results.setdefault(setting, {}).setdefault(name, EpisodeAccuracies())
                store.update(episode, episode_accuracy(logits, targets))

    def on_test_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        for setting, stores in sorted(self.results.items()):
            for name, store in stores.items():
                mean, ci95 = mean_ci95(store.compute(pl_module))
                pl_module.log(f"test/baseline_{name}_acc_{setting}", mean, add_dataloader_idx=False)
                pl_module.log(f"test/baseline_{name}_ci95_{setting}", ci95, add_dataloader_idx=False)


class EpisodeImageLogger(Callback):
    """Logs the first ``num_episodes`` test episodes of each setting as ``test/episode_grid_<setting>``: support |
    queries (green right, red wrong). Drawn from the test batches themselves, so it has no epoch cadence.

    Args:
        num_episodes: episodes per setting.
        max_queries: queries shown per class.
    """

    def __init__(self, num_episodes: int = 2, max_queries: int = 5) -> None:
        self.num_episodes, self.max_queries = num_episodes, max_queries

    @rank_zero_only
    def on_test_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx >= self.num_episodes or not isinstance(outputs, dict) or "scores" not in outputs:
            return
        support, query, classes = batch
        n_way, k_shot, n_query = support.shape[0], support.shape[1], query.shape[1]
        shown = min(n_query, self.max_queries)
        predicted = outputs["scores"].argmax(-1).view(n_way, n_query)[:, :shown]
        correct = predicted == torch.arange(n_way, device=predicted.device).unsqueeze(1)
        denormalize = getattr(trainer.datamodule, "denormalize", None)

        def prepare(images: torch.Tensor) -> torch.Tensor:
            images = denormalize(images) if denormalize is not None else images.clamp(0, 1)
            return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

        support_images = prepare(support.flatten(0, 1).float()).view(n_way, k_shot, 3, *support.shape[-2:])
        query_images = prepare(query[:, :shown].flatten(0, 1).float()).view(n_way, shown, 3, *query.shape[-2:])
        frame = torch.where(correct, 1, 0).float()  # 1 green, 0 red
        colour = torch.stack([1 - frame, frame, torch.zeros_like(frame)], dim=-1)[..., None, None]  # (N, S, 3, 1, 1)
        framed = F.pad(query_images, (2, 2, 2, 2))
        border = torch.ones_like(framed, dtype=torch.bool)
        border[..., 2:-2, 2:-2] = False
        framed = torch.where(border, colour.expand_as(framed), framed)
        support_padded = F.pad(support_images, (2, 2, 2, 2), value=1.0)
        rows = torch.cat([support_padded, framed], dim=1).flatten(0, 1).cpu()
        grid = make_grid(rows, nrow=k_shot + shown, padding=2, pad_value=1.0)
        setting = f"{n_way}way{k_shot}shot"
        caption = (f"{setting} episode {batch_idx}: rows = classes {classes.tolist()}; first {k_shot} support, then "
                   f"queries (green right, red wrong)")
        log_images(trainer, f"test/episode_grid_{setting}", grid.unsqueeze(0), [caption],
                   png_name=f"episodes/{setting}_{batch_idx}.png")


class EpisodePredictionWriter(PredictionWriter):
    """``zoo predict`` for the few-shot methods (``EpisodicModule.prediction_writer``).

    On the test episodes (no ``predict_dir``; every setting of ``data.init_args.test_episodes``, the episodes
    ``zoo test`` scores):

    * ``episodes.csv``: one row per query, ``setting, episode, query, true_class, true_class_name, predicted_class,
      predicted_class_name, correct``; ``query`` is the index in the episode's class-major query set, classes are the
      test split's class ids (names when the datamodule has them);
    * ``summary.csv``: per setting ``setting, n_way, k_shot, n_query, episodes, accuracy, ci95``: the mean accuracy
      in % over the episodes ± ``1.96·std/√n``, the formula and numbers of ``test/acc_<setting>``.

    On a ``predict_dir`` (``FolderEpisode``): ``predictions.csv`` with ``path, predicted_class, score, probability``
    per query image, the class being a ``support/`` folder name, ``score`` the method's score of that class and
    ``probability`` its softmax probability (empty for Siamese and MSE RelationNet, whose scores are not logits).

    Args:
        output_dir: see ``PredictionWriter``.
    """

    def rows(self, outputs: Any, batch: Any, dataloader_idx: int, folder: Path, trainer: "L.Trainer",
             pl_module: "L.LightningModule") -> list[tuple]:
        if "paths" in outputs:
            probabilities = outputs["probability"]
            return [("image", path, outputs["class_names"][label], score + 0.0, probability)  # + 0.0: no "-0"
                    for path, label, score, probability in zip(
                        outputs["paths"], self.to_list(outputs["predicted"]), self.to_list(outputs["score"]),
                        self.to_list(probabilities) if probabilities is not None else [None] * len(outputs["paths"]))]
        classes = self.to_list(outputs["classes"])
        setting, episode = outputs["setting"], int(outputs["episode"])
        return [("query", dataloader_idx, setting, episode, query, classes[target], classes[predicted])
                for query, (target, predicted) in enumerate(zip(self.to_list(outputs["targets"]),
                                                                self.to_list(outputs["predicted"])))]

    def finish(self, rows: list[tuple], folder: Path, trainer: "L.Trainer", pl_module: "L.LightningModule"
               ) -> list[Path]:
        written = []
        images = sorted({row[1]: row for row in rows if row[0] == "image"}.values())  # one row per path
        if images:
            written.append(write_csv(folder / "predictions.csv", ["path", "predicted_class", "score", "probability"],
                                     [row[1:4] + ("" if row[4] is None else row[4],) for row in images]))
        queries = sorted(row[1:] for row in rows if row[0] == "query")  # by loader (setting), episode, query
        if queries:
            written += self._write_episodes(queries, folder, trainer)
        return written

    @staticmethod
    def _class_names(trainer: "L.Trainer") -> list[str] | None:
        class_names = getattr(trainer.datamodule, "class_names", None)
        try:
            return list(class_names("test")) if class_names is not None else None
        except (KeyError, AttributeError):
            return None

    def _write_episodes(self, queries: list[tuple], folder: Path, trainer: "L.Trainer") -> list[Path]:
        names = self._class_names(trainer)
        name = (lambda c: names[c]) if names is not None else (lambda c: "")  # noqa: E731
        episodes_csv = write_csv(
            folder / "episodes.csv",
            ["setting", "episode", "query", "true_class", "true_class_name", "predicted_class", "predicted_class_name",
             "correct"],
            [(setting, episode, query, true, name(true), predicted, name(predicted), int(true == predicted))
             for _, setting, episode, query, true, predicted in queries])
        summary = []
        for setting in dict.fromkeys(row[1] for row in queries):  # in the loaders' order
            in_setting = [row for row in queries if row[1] == setting]
            episode = torch.tensor([row[2] for row in in_setting])
            correct = torch.tensor([row[4] == row[5] for row in in_setting], dtype=torch.float32)
            # per-episode accuracy in % as test_step computes it (float32 mean of hits, times 100)
            ids, position = episode.unique(return_inverse=True)
            hits = torch.zeros(len(ids)).index_add_(0, position, correct)
            queries_per_episode = torch.bincount(position, minlength=len(ids)).float()
            accuracy, ci95 = mean_ci95(hits / queries_per_episode * 100)
            n_way, k_shot = parse_setting(setting)
            n_query = int(queries_per_episode[0]) // n_way
            summary.append((setting, n_way, k_shot, n_query, len(ids), accuracy, ci95))
            print(f"[zoo] {setting}: accuracy {accuracy:.2f} ± {ci95:.2f} % over {len(ids)} episodes", flush=True)
        summary_csv = write_csv(folder / "summary.csv",
                                ["setting", "n_way", "k_shot", "n_query", "episodes", "accuracy", "ci95"], summary)
        return [episodes_csv, summary_csv]
