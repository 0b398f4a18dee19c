"""What every few-shot method shares: the episode contract, per-episode accuracy with a 95 % CI, and the Lightning
loop around a method's ``episode_logits``.

An episode is ``(support (N, K, C, H, W), query (N, Q, C, H, W), classes (N,))`` (``datamodules.fewshot.episodes.Episode``);
query labels are implicit, ``arange(N).repeat_interleave(Q)``. A method implements
``episode_logits(support, query) -> (N·Q, N)`` scores whose argmax is the prediction, and ``episode_loss`` if its
loss is not cross-entropy on those scores. Evaluation follows "A Closer Look at Few-shot Classification"
(Chen et al. 2019): accuracy in % per episode, reported as ``mean ± 1.96·std/√n`` over the episodes (numpy's std,
ddof = 0), 600 test episodes with 15 queries per class. At the end of ``zoo test`` the per-setting results go to the
table ``test/accuracy_by_setting`` (W&B and ``<run>/tables/``), beside ``EpisodeBaselines``' when it ran.

``zoo predict`` (writer: ``zoo.fewshot.callbacks.EpisodePredictionWriter``) classifies the queries of every test
episode, or, with ``data.init_args.predict_dir``, one's own query images given labelled support images
(``support_set_logits``: a support set of ``S`` images with episode labels, any number of ways; equal numbers of
shots per class except for methods with ``unequal_shots``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from zoo.callbacks import log_table
from zoo.distributed import gather_by_index

__all__ = ["query_targets", "episode_accuracy", "mean_ci95", "parse_setting", "EpisodeAccuracies", "EpisodicModule"]


def query_targets(n_way: int, n_query: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Episode-local labels of the flattened query set: ``[0]*Q + [1]*Q + ... + [N-1]*Q``."""
    return torch.arange(n_way, device=device).repeat_interleave(n_query)


def episode_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy in % of one episode's predictions."""
    return (scores.argmax(-1) == targets).float().mean() * 100


def mean_ci95(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and 95 % confidence half-width ``1.96·std/√n`` (population std, as CloserLook and Finn et al. report)."""
    accuracies = accuracies.double()
    return float(accuracies.mean()), float(1.96 * accuracies.std(unbiased=False) / math.sqrt(len(accuracies)))


def parse_setting(setting: str) -> tuple[int, int]:
    """``(n_way, k_shot)`` of a setting name such as ``5way1shot``."""
    match = re.fullmatch(r"(\d+)way(\d+)shot", setting)
    if match is None:
        raise ValueError(f"not a setting name (<N>way<K>shot): {setting!r}")
    return int(match.group(1)), int(match.group(2))


class EpisodeAccuracies:
    """Per-episode accuracies of one evaluation setting, gathered over DDP ranks without duplicates or padding.

    Each rank records ``(global episode index, accuracy)``; ``compute`` all-gathers (ranks may hold one episode more
    than others: the fixed episodes are split ``[rank::world_size]``), drops the padding and sorts by episode, so the
    result equals the single-process one.
    """

    def __init__(self) -> None:
        self.index: list[int] = []
        self.value: list[torch.Tensor] = []

    def update(self, episode: int, accuracy: torch.Tensor) -> None:
        self.index.append(episode)
        self.value.append(accuracy.detach().float().reshape(()))

    def __len__(self) -> int:
        return len(self.index)

    def compute(self, module: L.LightningModule) -> torch.Tensor:
        device = module.device
        index = torch.tensor(self.index, dtype=torch.long, device=device)
        value = torch.stack(self.value).to(device) if self.value else torch.zeros(0, device=device)
        return gather_by_index(module, index, value=value)["value"].cpu()

    def reset(self) -> None:
        self.index.clear()
        self.value.clear()


class EpisodicModule(L.LightningModule):
    """Base LightningModule of the episodic methods: trains on one episode per step, evaluates on fixed episodes.

    Logs ``train/loss``, ``train/acc`` (%), ``val/acc`` (mean over the fixed validation episodes, gathered over
    ranks), and for every test setting ``test/acc_<N>way<K>shot``, ``test/ci95_<N>way<K>shot`` and
    ``test/num_episodes_<N>way<K>shot``.

    Args:
        backbone: the embedding network ``f``: images ``(B, C, H, W)`` → features (flattened by ``embed``).
        feature_dim: size of the flattened features (Conv-4: 1600 at 84×84, 64 at 28×28); checked on the first batch.
        lr: Adam learning rate (CloserLook: 1e-3, no schedule); a CLI ``optimizer:`` overrides it.
    """

    def __init__(self, *, backbone: nn.Module, feature_dim: int, lr: float = 1e-3) -> None:
        super().__init__()
        # Channels-last convolutions: the same arithmetic, and on CPU the Conv-4 episode step (joint support + query
        # batch of 100 at 28x28, forward + backward) runs 1.6x faster than in the default layout (bench/fewshot.py).
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.feature_dim, self.lr = feature_dim, lr
        self.val_accuracies = EpisodeAccuracies()
        self.test_accuracies: dict[str, EpisodeAccuracies] = {}
        self._test_results: list[tuple[str, int, float, float]] = []  # (setting, episodes, mean, ci95) of a test

    #: ``support_set_logits`` takes classes with different numbers of shots (otherwise it asks for equal ones)
    unequal_shots: bool = False
    #: the scores are logits or log-probabilities, so their softmax is the class probability (not so for scores that
    #: are independent similarities in (0, 1): Siamese, RelationNet with the MSE loss)
    scores_are_logits: bool = True

    # ---- the method's part ----
    def episode_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Scores ``(N·Q, N)`` of every query against every episode class."""
        raise NotImplementedError

    def support_set_logits(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                           query: torch.Tensor) -> torch.Tensor:
        """Scores ``(M, N)`` of queries ``(M, C, H, W)`` given labelled support images ``(S, C, H, W)`` whose episode
        classes ``support_labels`` lie in ``0..N-1`` (``zoo predict`` on a ``predict_dir``).

        The default reorders the support into the episode contract ``(N, K, ...)``, which needs the same ``K`` for
        every class, and scores the queries as one class-free row, ``(1, M, ...)``: the methods flatten the query
        set, so any ``M`` works. A method that takes unequal shots overrides it and sets ``unequal_shots``.
        """
        counts = torch.bincount(support_labels, minlength=n_way)
        if (counts != counts[0]).any() or counts[0] == 0:
            raise ValueError(f"{type(self).__name__} needs the same number of support images in every class, got "
                             f"{counts.tolist()}")
        order = torch.argsort(support_labels, stable=True)
        episode_support = support[order].view(n_way, int(counts[0]), *support.shape[1:])
        return self.episode_logits(episode_support, query.unsqueeze(0))

    def class_probabilities(self, scores: torch.Tensor) -> Optional[torch.Tensor]:
        """Class probabilities ``(M, N)`` of ``episode_logits`` scores; ``None`` where the scores are not logits."""
        return scores.float().softmax(-1) if self.scores_are_logits else None

    def episode_loss(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, targets)

    # ---- shared ----
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Flattened features ``(B, feature_dim)`` of images ``(B, C, H, W)``."""
        if images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images).flatten(1)
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"the backbone gives {features.shape[1]}-d features for {tuple(images.shape[1:])} "
                             f"images, but feature_dim={self.feature_dim}: set `model.init_args.feature_dim: "
                             f"{features.shape[1]}`")
        return features

    def embed_episode(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass over support and query: ``(N, K, D)`` and ``(N·Q, D)``."""
        n_way, k_shot = support.shape[:2]
        features = self.embed(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
        return features[: n_way * k_shot].view(n_way, k_shot, -1), features[n_way * k_shot :]

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.episode_logits(support, query)

    def _scores_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        support, query, _ = batch
        scores = self.episode_logits(support, query)
        return scores, query_targets(query.shape[0], query.shape[1], scores.device)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        scores, targets = self._scores_and_targets(batch)
        loss = self.episode_loss(scores, targets)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", episode_accuracy(scores, targets), prog_bar=True)
        return loss

    def evaluate_episode(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and targets of an evaluation episode (Baseline and MAML adapt here with gradients enabled)."""
        return self._scores_and_targets(batch)

    def _episode_index(self, batch_idx: int) -> int:
        # the fixed evaluation sampler gives rank r the episodes r, r + world, r + 2·world, ...
        return self.global_rank + batch_idx * self.trainer.world_size

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        scores, targets = self.evaluate_episode(batch)
        self.val_accuracies.update(self._episode_index(batch_idx), episode_accuracy(scores, targets))

    def on_validation_epoch_end(self) -> None:
        accuracies = self.val_accuracies.compute(self)
        self.val_accuracies.reset()
        if len(accuracies):
            mean, ci95 = mean_ci95(accuracies)
            self.log("val/acc", mean, prog_bar=True, rank_zero_only=False)  # identical on every rank after gather
            self.log("val/ci95", ci95)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        scores, targets = self.evaluate_episode(batch)
        support = batch[0]
        setting = f"{support.shape[0]}way{support.shape[1]}shot"
        accuracy = episode_accuracy(scores, targets)
        self.test_accuracies.setdefault(setting, EpisodeAccuracies()).update(self._episode_index(batch_idx), accuracy)
        return {"scores": scores.detach(), "accuracy": accuracy, "setting": setting}

    def on_test_epoch_end(self) -> None:
        self._test_results = []
        for setting, store in sorted(self.test_accuracies.items()):
            accuracies = store.compute(self)
            mean, ci95 = mean_ci95(accuracies)
            self.log(f"test/acc_{setting}", mean, add_dataloader_idx=False)
            self.log(f"test/ci95_{setting}", ci95, add_dataloader_idx=False)
            self.log(f"test/num_episodes_{setting}", float(len(accuracies)), add_dataloader_idx=False)
            self._test_results.append((setting, len(accuracies), mean, ci95))
        self.test_accuracies.clear()

    def on_test_end(self) -> None:
        """The table ``test/accuracy_by_setting``: one row per test setting, with the ``EpisodeBaselines`` on the same
        episodes when that callback ran (its metrics are final only now, after every epoch-end hook)."""
        results = self._test_results
        if not results or not self.trainer.is_global_zero:
            return
        metrics = self.trainer.callback_metrics
        baselines = [name for name in ("pixels", "random")
                     if all(f"test/baseline_{name}_acc_{setting}" in metrics for setting, *_ in results)]
        columns = ["setting", "n_way", "k_shot", "episodes", "accuracy", "ci95"]
        columns += [f"baseline_{name}_{what}" for name in baselines for what in ("accuracy", "ci95")]
        rows = []
        for setting, episodes, mean, ci95 in sorted(results, key=lambda result: parse_setting(result[0])):
            n_way, k_shot = parse_setting(setting)
            row: list[Any] = [setting, n_way, k_shot, episodes, mean, ci95]
            row += [float(metrics[f"test/baseline_{name}_{what}_{setting}"]) for name in baselines
                    for what in ("acc", "ci95")]
            rows.append(row)
        log_table(self.trainer, "test/accuracy_by_setting", columns, rows)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """A test episode: its setting, global episode index, split class ids ``(N,)``, the episode-local target and
        prediction of every query ``(N·Q,)``. A ``predict_dir`` episode (a dict, ``FolderEpisode``): the query paths,
        the support class names, and per query the predicted episode class, its score and its probability (``None``
        when the scores are not logits)."""
        if isinstance(batch, dict):
            return self._predict_folder_episode(batch)
        scores, targets = self.evaluate_episode(batch)
        support, query, classes = batch
        return {"setting": f"{support.shape[0]}way{support.shape[1]}shot", "episode": self._episode_index(batch_idx),
                "classes": classes, "targets": targets, "predicted": scores.argmax(-1)}

    def _predict_folder_episode(self, batch: dict[str, Any]) -> dict[str, Any]:
        names, labels = batch["class_names"], batch["support_labels"]
        counts = torch.bincount(labels, minlength=len(names))
        if not self.unequal_shots and (counts != counts[0]).any():
            shots = ", ".join(f"{name}: {int(c)}" for name, c in zip(names, counts))
            raise ValueError(f"{type(self).__name__} needs the same number of support images in every class; "
                             f"predict_dir support/ holds {shots}. Give every class folder as many images "
                             "(ProtoNet takes different numbers).")
        scores = self.support_set_logits(batch["support"], labels, len(names), batch["query"])
        predicted = scores.argmax(-1, keepdim=True)
        probabilities = self.class_probabilities(scores)
        return {"paths": batch["paths"], "class_names": names, "predicted": predicted.squeeze(1),
                "score": scores.gather(1, predicted).squeeze(1),
                "probability": None if probabilities is None else probabilities.gather(1, predicted).squeeze(1)}

    def prediction_writer(self) -> "L.Callback":
        """``zoo predict``'s writer: ``episodes.csv`` + ``summary.csv`` on the test episodes, ``predictions.csv`` on a
        ``predict_dir`` (``zoo.fewshot.callbacks.EpisodePredictionWriter``)."""
        from zoo.fewshot.callbacks import EpisodePredictionWriter  # noqa: PLC0415 (callbacks imports this module)

        return EpisodePredictionWriter()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
