import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, run_zoo, write_closerlook, write_omniglot
from datamodules.base import DatasetNotFoundError
from datamodules.fewshot import CloserLookDataModule, EpisodeSetting, EpisodicBatchSampler, OmniglotDataModule
from datamodules.sampler import ClassBalancedBatchSampler
from zoo.backbones import ConvNet
from zoo.fewshot.baseline import Baseline, CosineClassifier
from zoo.fewshot.episodic import EpisodeAccuracies, mean_ci95, query_targets
from zoo.fewshot.maml import MAML, adapt
from zoo.fewshot.matching_net import MatchingNet
from zoo.fewshot.protonet import ProtoNet
from zoo.fewshot.relation_net import RelationNet
from zoo.fewshot.siamese import SiameseNet


class Flat(nn.Module):
    """Identity backbone: the 'images' are already feature vectors (B, D, 1, 1)."""

    def forward(self, x):
        return x


def _episode(n_way=3, k_shot=2, n_query=4, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_way, k_shot, dim, 1, 1, generator=g, dtype=torch.float64),
            torch.randn(n_way, n_query, dim, 1, 1, generator=g, dtype=torch.float64))


# ---------------------------------------------------------------- the methods' equations

def test_protonet_logits_are_negative_squared_distances_to_hand_computed_means():
    support, query = _episode()
    model = ProtoNet(backbone=Flat(), feature_dim=5).double()
    logits = model.episode_logits(support, query)
    zs, zq = support.flatten(2), query.flatten(0, 1).flatten(1)
    means = [zs[k].sum(0) / 2 for k in range(3)]
    expected = torch.tensor([[-float(((q - c) ** 2).sum()) for c in means] for q in zq], dtype=torch.float64)
    assert torch.allclose(logits, expected)
    # easyfsl scores with the unsquared distance: same predictions, different values
    unsquared = -torch.cdist(zq, torch.stack(means))
    assert torch.equal(logits.argmax(1), unsquared.argmax(1)) and not torch.allclose(logits, unsquared)


def test_matching_net_without_fce_is_softmax_over_scaled_cosines_and_ignores_support_order():
    support, query = _episode()
    model = MatchingNet(backbone=Flat(), feature_dim=5, fce=False).double()
    log_p = model.episode_logits(support, query)
    zs, zq = support.flatten(0, 1).flatten(1), query.flatten(0, 1).flatten(1)
    cos = F.cosine_similarity(zq[:, None], zs[None], dim=-1)
    attention = torch.softmax(100 * cos.clamp(min=0), dim=1)
    expected = torch.stack([attention[:, 2 * k: 2 * k + 2].sum(1) for k in range(3)], dim=1)
    assert torch.allclose(log_p.exp(), expected + 1e-6)
    assert torch.allclose(expected.sum(1), torch.ones(12, dtype=torch.float64))
    shuffled = support[:, [1, 0]]  # swap the shots inside every class
    assert torch.allclose(model.episode_logits(shuffled, query), log_p)
    fce = MatchingNet(backbone=Flat(), feature_dim=5, fce=True).double()  # the BiLSTM reads the support as a sequence
    assert not torch.allclose(fce.episode_logits(shuffled, query), fce.episode_logits(support, query))


def test_relation_net_shapes_and_mse_loss_against_one_hot():
    backbone = ConvNet(3, num_pools=2, padding=[0, 0, 1, 1])
    assert backbone(torch.zeros(1, 3, 84, 84)).shape == (1, 64, 19, 19)
    model = RelationNet(backbone=backbone, feature_channels=64, feature_size=19)
    assert model.relation.convs[0].in_channels == 128 and model.relation.fc[0].in_features == 64 * 3 * 3
    omniglot = RelationNet(backbone=ConvNet(1, num_pools=2, padding=[0, 0, 1, 1]), feature_channels=64, feature_size=5)
    support, query = torch.randn(4, 2, 1, 28, 28), torch.randn(4, 3, 1, 28, 28)
    scores = omniglot.episode_logits(support, query)
    assert scores.shape == (12, 4) and (scores > 0).all() and (scores < 1).all()
    targets = query_targets(4, 3)
    onehot = torch.zeros(12, 4)
    onehot[torch.arange(12), targets] = 1
    assert torch.allclose(omniglot.episode_loss(scores, targets), ((scores - onehot) ** 2).mean())


def test_siamese_similarity_is_symmetric_and_classifies_by_it():
    torch.manual_seed(0)
    model = SiameseNet(backbone=Flat(), feature_dim=5).double()
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    assert torch.allclose(model.similarity(a, b), model.similarity(b, a).T)
    support, query = _episode()
    p = model.episode_logits(support, query)
    pairs = torch.sigmoid(model.similarity(query.flatten(0, 1).flatten(1), support.flatten(0, 1).flatten(1)))
    assert torch.allclose(p, pairs.view(12, 3, 2).mean(2))


def test_baseline_pp_cosine_logits_are_bounded_and_scale_invariant():
    torch.manual_seed(0)
    x = torch.randn(10, 16) * 5
    fixed = CosineClassifier(16, 7, scale=2.0, learnable_norm=False)
    assert fixed(x).abs().max() <= 2.0 + 1e-6
    assert torch.allclose(fixed(7 * x), fixed(x), atol=1e-5)
    learned = CosineClassifier(16, 7)  # CloserLook's weight-normalised version: bounded by scale · g_c
    g = learned.linear.parametrizations.weight.original0.detach().flatten()
    assert (learned(x).abs() <= learned.scale * g + 1e-5).all()
    assert CosineClassifier(16, 201).scale == 10.0 and learned.scale == 2.0


def test_ci95_is_population_std_formula():
    mean, ci = mean_ci95(torch.tensor([50.0, 100.0]))
    assert mean == 75.0 and ci == pytest.approx(1.96 * 25 / math.sqrt(2))


# ---------------------------------------------------------------- MAML

class TinyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def test_first_order_maml_meta_gradient_is_the_query_gradient_at_adapted_params():
    torch.manual_seed(0)
    model = TinyLinear().double()
    xs, ys = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1])
    xq, yq = torch.randn(4, 3, dtype=torch.float64), torch.tensor([1, 0, 1, 0])
    params = dict(model.named_parameters())
    adapted = adapt(model, params, xs, ys, steps=1, inner_lr=0.5, first_order=True)
    meta = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, adapted, (xq,)), yq),
                               list(params.values()))
    # by hand: θ' = θ − α∇L_s(θ), then the gradient of L_q at θ' as a fresh leaf
    g_s = torch.autograd.grad(F.cross_entropy(model(xs), ys), list(params.values()))
    leaves = {n: (p - 0.5 * g).detach().requires_grad_() for (n, p), g in zip(params.items(), g_s)}
    by_hand = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, leaves, (xq,)), yq),
                                  list(leaves.values()))
    for a, b in zip(meta, by_hand):
        assert torch.allclose(a, b)


def test_second_order_maml_matches_the_quadratic_closed_form():
    # L_s = ½ θᵀAθ ⇒ θ' = (I − αA)θ and dL_q(θ')/dθ = (I − αA)ᵀ ∇L_q(θ')
    torch.manual_seed(0)
    a_half = torch.randn(3, 3, dtype=torch.float64)
    a = a_half @ a_half.T
    target = torch.randn(3, dtype=torch.float64)

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x):
            return self.theta

    model = Quadratic()
    alpha = 0.1
    params = dict(model.named_parameters())
    support_loss = lambda p: 0.5 * p["theta"] @ a @ p["theta"]  # noqa: E731
    grads = torch.autograd.grad(support_loss(params), [params["theta"]], create_graph=True)
    theta_prime = params["theta"] - alpha * grads[0]
    query_loss = 0.5 * ((theta_prime - target) ** 2).sum()
    second = torch.autograd.grad(query_loss, params["theta"])[0]
    expected = (torch.eye(3, dtype=torch.float64) - alpha * a).T @ (theta_prime.detach() - target)
    assert torch.allclose(second, expected)
    assert not torch.allclose(second, theta_prime.detach() - target)  # first order would give this


def test_maml_adaptation_reduces_support_loss_and_never_mutates_the_model():
    torch.manual_seed(0)
    model = MAML(backbone=ConvNet(1, widths=[8, 8]), feature_dim=8 * 7 * 7, n_way=3, inner_lr=0.1, inner_steps=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any("running_mean" in k for k in before)  # transductive BN: no running statistics
    support = torch.randn(3, 2, 1, 28, 28)
    labels = query_targets(3, 2)
    params = dict(model.named_parameters())
    loss_before = F.cross_entropy(model(support.flatten(0, 1)), labels)
    adapted = adapt(model, params, support.flatten(0, 1), labels, 5, 0.1, first_order=False)
    loss_after = F.cross_entropy(torch.func.functional_call(model, adapted, (support.flatten(0, 1),)), labels)
    assert loss_after < loss_before
    query_loss = F.cross_entropy(torch.func.functional_call(model, adapted, (support.flatten(0, 1),)), labels)
    query_loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- samplers

def _labels(n_classes=12, per_class=9, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.permutation(np.repeat(np.arange(n_classes), per_class)))


def test_episodes_have_n_distinct_classes_and_k_plus_q_distinct_images_of_one_class_per_row():
    labels = _labels()
    sampler = EpisodicBatchSampler(labels, n_way=5, k_shot=2, n_query=3, episodes=200, world_size=1, rank=0)
    episodes = list(sampler)
    assert len(episodes) == 200
    for episode in episodes:
        rows = torch.tensor(episode).view(5, 5)
        assert len(set(episode)) == 25  # support ∩ query = ∅, no repeats
        row_labels = labels[rows]
        assert (row_labels == row_labels[:, :1]).all() and len(set(row_labels[:, 0].tolist())) == 5
    # every class gets drawn, and the draws are not always the same images
    assert set(labels[torch.tensor(episodes)].flatten().tolist()) == set(range(12))
    assert len({tuple(e) for e in episodes}) == 200


def test_classes_too_small_for_an_episode_are_skipped():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 2 + [3] * 5)
    with pytest.warns(UserWarning, match="fewer than"):
        sampler = EpisodicBatchSampler(labels, 3, 1, 3, 20, world_size=1, rank=0)
    assert 2 not in set(labels[torch.tensor(list(sampler))].flatten().tolist())
    with pytest.raises(ValueError, match="need 4 classes"):
        EpisodicBatchSampler(labels, 4, 1, 3, 20, world_size=1, rank=0)


def test_training_episodes_differ_across_ranks_and_epochs_and_repeat_for_the_same_seed():
    labels = _labels()
    make = lambda rank, seed=0: EpisodicBatchSampler(labels, 5, 1, 2, 40, seed=seed, rank=rank,  # noqa: E731
                                                     world_size=2)
    r0, r1 = make(0), make(1)
    assert len(r0) == len(r1) == 20
    e0, e1 = list(r0), list(r1)
    assert e0 != e1 and e0 == list(make(0))
    r0.set_epoch(1)
    assert list(r0) != e0
    assert list(make(0, seed=1)) != e0


@pytest.mark.parametrize("world_size", [2, 3])
def test_fixed_evaluation_episodes_are_the_same_for_any_world_size(world_size):
    labels = _labels()
    single = list(EpisodicBatchSampler(labels, 5, 1, 2, 31, seed=4, fixed=True, rank=0, world_size=1))
    shards = [list(EpisodicBatchSampler(labels, 5, 1, 2, 31, seed=4, fixed=True, rank=r, world_size=world_size))
              for r in range(world_size)]
    merged = [None] * 31
    for r, shard in enumerate(shards):
        merged[r::world_size] = shard
    assert merged == single
    sampler = EpisodicBatchSampler(labels, 5, 1, 2, 31, seed=4, fixed=True, rank=0, world_size=1)
    sampler.set_epoch(5)
    assert list(sampler) == single


def test_class_balanced_batches_cover_classes_evenly_and_split_ranks():
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 20 + [3] * 20)
    r0 = ClassBalancedBatchSampler(labels, batch_size=8, rank=0, world_size=2)
    r1 = ClassBalancedBatchSampler(labels, batch_size=8, rank=1, world_size=2)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == 5
    flat0, flat1 = sum(b0, []), sum(b1, [])
    assert not set(flat0) & set(flat1)
    for batch in b0 + b1:
        assert torch.bincount(labels[batch], minlength=4).tolist() == [2, 2, 2, 2]
    r0.set_epoch(1)
    assert list(r0) != b0


def test_episode_accuracies_sort_by_episode_without_duplicates():
    store = EpisodeAccuracies()
    for episode, acc in [(2, 30.0), (0, 10.0), (1, 20.0)]:
        store.update(episode, torch.tensor(acc))

    class NoTrainer:
        device = torch.device("cpu")
        _trainer = None

    assert store.compute(NoTrainer()).tolist() == [10.0, 20.0, 30.0]


# ---------------------------------------------------------------- on-disk formats

def test_omniglot_layout_rotations_are_new_classes_within_one_split(tmp_path):
    write_omniglot(tmp_path)
    dm = OmniglotDataModule(root=str(tmp_path), rotations=[0, 90, 180, 270], val_alphabets=1)
    dm.setup()
    train = dm.splits["train"]
    assert dm.num_classes == 8 * 4 and train.class_names[:2] == ["Alpha/character01/rot000",
                                                                   "Alpha/character01/rot090"]
    assert len(dm.splits["val"].class_names) == 3 * 4 and len(dm.splits["test"].class_names) == 7 * 4
    chars = lambda split: {n.rsplit("/", 1)[0] for n in dm.splits[split].class_names}  # noqa: E731
    assert not chars("train") & chars("val") and not chars("train") & chars("test")
    ds = dm.train_set
    upright = (ds.labels == 0).nonzero()[0, 0]
    turned = ((ds.labels == 1) & (ds.file_index == ds.file_index[upright])).nonzero()[0, 0]
    image0, label0 = ds[int(upright)]
    image90, label90 = ds[int(turned)]
    assert label0 != label90 and torch.equal(image90, torch.rot90(image0, 1, dims=(-2, -1)))
    assert image0.shape == (1, 28, 28) and image0.mean() < 0.5  # inverted: strokes bright on a dark background


def test_omniglot_vinyals_split_files(tmp_path):
    write_omniglot(tmp_path / "omniglot")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("Alpha/character01/rot000\nAlpha/character01/rot090\nBeta/character02/rot000\n")
    (splits / "val.txt").write_text("Gamma/character01/rot000\nGamma/character02/rot000\n")
    (splits / "test.txt").write_text("Delta/character01/rot180\nEpsilon/character03/rot000\n")
    dm = OmniglotDataModule(root=str(tmp_path / "omniglot"), split_dir=str(splits))
    dm.setup()
    assert dm.splits["test"].class_names == ["Delta/character01/rot180", "Epsilon/character03/rot000"]
    assert dm.splits["test"].class_rotations == [180, 0] and len(dm.train_set) == 3 * 6
    (splits / "val.txt").write_text("Gamma/character09/rot000\n")
    with pytest.raises(DatasetNotFoundError, match="Gamma/character09"):
        OmniglotDataModule(root=str(tmp_path / "omniglot"), split_dir=str(splits)).setup()


def test_missing_omniglot_folder_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="images_background") as err:
        OmniglotDataModule(root=str(tmp_path / "nowhere")).setup()
    assert "character<NN>" in str(err.value)


def test_closerlook_json_episodes_and_batches(tmp_path):
    write_closerlook(tmp_path)
    dm = CloserLookDataModule(root=str(tmp_path), image_size=32, train_episodes=EpisodeSetting(3, 2, 2, 4),
                              val_episodes=EpisodeSetting(3, 1, 2, 3), num_workers=0, pin_memory=False)
    dm.setup()
    assert dm.num_classes == 6 and dm.class_names("test")[0] == "n00000011"
    episode = next(iter(dm.train_dataloader()))
    assert episode.support.shape == (3, 2, 3, 32, 32) and episode.query.shape == (3, 2, 3, 32, 32)
    batch_dm = CloserLookDataModule(root=str(tmp_path), image_size=32, train_mode="batch", batch_size=6, num_workers=0)
    batch_dm.setup()
    images, labels = next(iter(batch_dm.train_dataloader()))
    assert images.shape == (6, 3, 32, 32) and sorted(labels.tolist()) == list(range(6))


@pytest.mark.parametrize("broken", ["split_file", "image"])
def test_closerlook_missing_split_file_or_image_is_named(tmp_path, broken):
    write_closerlook(tmp_path)
    if broken == "split_file":
        (tmp_path / "val.json").unlink()
        name = "val.json"
    else:
        victim = sorted((tmp_path / "images").rglob("*.jpg"))[3]
        victim.unlink()
        name = victim.name
    with pytest.raises(DatasetNotFoundError, match=name):
        CloserLookDataModule(root=str(tmp_path), num_workers=0).setup()


# ---------------------------------------------------------------- in Lightning's loops

def _omniglot_dm(root, **kwargs):
    settings = dict(train_episodes=EpisodeSetting(3, 2, 2, 6), val_episodes=EpisodeSetting(3, 1, 2, 4),
                    test_episodes=[EpisodeSetting(3, 1, 3, 5), EpisodeSetting(3, 2, 2, 3)])
    return OmniglotDataModule(root=str(root), val_alphabets=1, rotations=[0, 90], **{**settings, **kwargs})


def _trainer(tmp_path, **kwargs):
    import lightning as L

    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_baseline_finetunes_a_head_inside_test_without_touching_the_backbone(tmp_path):
    write_omniglot(tmp_path / "omniglot")
    dm = _omniglot_dm(tmp_path / "omniglot", train_mode="batch", batch_size=8)
    model = Baseline(backbone=ConvNet(1), feature_dim=64, num_classes=16, classifier="cosine", finetune_epochs=5)
    trainer = _trainer(tmp_path)
    trainer.fit(model, dm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.test(model, dm, verbose=False)  # Lightning's default inference_mode=True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = trainer.callback_metrics
    assert metrics["test/num_episodes_3way1shot"] == 5 and metrics["test/num_episodes_3way2shot"] == 3
    assert 0 <= metrics["test/acc_3way1shot"] <= 100


def test_every_method_trains_validates_and_tests_on_omniglot_layout(tmp_path):
    write_omniglot(tmp_path / "omniglot")
    methods = {
        "protonet": ProtoNet(backbone=ConvNet(1), feature_dim=64),
        "matching": MatchingNet(backbone=ConvNet(1), feature_dim=64),
        "relation": RelationNet(backbone=ConvNet(1, num_pools=2, padding=[0, 0, 1, 1]), feature_channels=64, feature_size=5),
        "siamese": SiameseNet(backbone=ConvNet(1), feature_dim=64),
        "maml": MAML(backbone=ConvNet(1), feature_dim=64, n_way=3, inner_steps=2, tasks_per_step=2),
    }
    for name, model in methods.items():
        trainer = _trainer(tmp_path / name)
        before = [p.clone() for p in model.parameters()]
        trainer.fit(model, _omniglot_dm(tmp_path / "omniglot"))
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name
        assert "val/acc" in trainer.callback_metrics, name
        trainer.test(model, _omniglot_dm(tmp_path / "omniglot"), verbose=False)
        assert {"test/acc_3way1shot", "test/ci95_3way2shot"} <= set(trainer.callback_metrics), name
    assert trainer.global_step == 3  # MAML: 6 tasks, 2 per meta-update


def test_ddp_two_processes_draw_different_episodes_and_gather_all_test_episodes(tmp_path):
    write_omniglot(tmp_path / "omniglot")
    out = tmp_path / "episodes"
    result = run_zoo(
        "fit", "-c", str(ROOT / "configs" / "fewshot" / "protonet_omniglot.yaml"),
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
        f"--data.init_args.root={tmp_path / 'omniglot'}", "--data.init_args.val_alphabets=1",
        "--data.init_args.split_dir=null", "--data.init_args.rotations=[0]",
        "--data.init_args.train_episodes={n_way: 3, k_shot: 1, n_query: 2, episodes: 8}",
        "--data.init_args.val_episodes={n_way: 3, k_shot: 1, n_query: 2, episodes: 5}",
        "--data.init_args.test_episodes=[{n_way: 3, k_shot: 1, n_query: 3, episodes: 7}]",
        "--trainer.callbacks=[{class_path: helpers.RecordEpisodes, init_args: {out: " + str(out) + "}}]",
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"episodes_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 4 and ranks[0]["train"] != ranks[1]["train"]
    assert len(ranks[0]["test"]) == 4 and len(ranks[1]["test"]) == 3  # 7 fixed episodes split [rank::2]
    metrics = (tmp_path / "run").rglob("metrics.csv")
    import csv

    rows = [r for r in csv.DictReader(open(next(metrics))) if r.get("test/num_episodes_3way1shot")]
    assert float(rows[-1]["test/num_episodes_3way1shot"]) == 7  # gathered from both ranks, none twice


FEWSHOT_CONFIGS = sorted((ROOT / "configs" / "fewshot").glob("*.yaml"))
TINY_EPISODES = ["--data.init_args.train_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 4}",
                 "--data.init_args.val_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 2}",
                 "--data.init_args.test_episodes=[{n_way: 5, k_shot: 1, n_query: 2, episodes: 2}]"]


def _vinyals_fixture(root):
    write_omniglot(root / "omniglot", alphabets={"images_background": {"Alpha": 3, "Beta": 3, "Gamma": 2},
                                                 "images_evaluation": {"Delta": 2}})
    splits = root / "splits"
    splits.mkdir()
    rots = ["rot000", "rot090", "rot180", "rot270"]
    lines = lambda chars: "\n".join(f"{c}/{r}" for c in chars for r in rots)  # noqa: E731
    (splits / "train.txt").write_text(lines([f"{a}/character0{i}" for a in ("Alpha", "Beta") for i in (1, 2, 3)]))
    (splits / "val.txt").write_text(lines(["Gamma/character01", "Gamma/character02"]))
    (splits / "test.txt").write_text(lines(["Delta/character01", "Delta/character02"]))
    return ["--data.init_args.root=" + str(root / "omniglot"), "--data.init_args.split_dir=" + str(splits)], 24


@pytest.mark.parametrize("config", FEWSHOT_CONFIGS, ids=[c.stem for c in FEWSHOT_CONFIGS])
def test_fewshot_config_fast_dev_run_on_its_format(config, tmp_path):
    from zoo.cli import ZooCLI

    if config.stem.endswith("_glyphs"):
        data = [f"--data.init_args.root={tmp_path / 'glyphs'}", "--data.init_args.background_alphabets=3",
                "--data.init_args.evaluation_alphabets=1", "--data.init_args.characters_per_alphabet=5",
                "--data.init_args.drawers=5", "--data.init_args.val_alphabets=1"]
        base_classes = 10
    elif config.stem.endswith("_omniglot"):
        data, base_classes = _vinyals_fixture(tmp_path)
    else:
        write_closerlook(tmp_path / "mini", per_class=4)
        data = [f"--data.init_args.root={tmp_path / 'mini'}", "--data.init_args.num_workers=0",
                "--data.init_args.pin_memory=false"]
        base_classes = 6
    extra = [f"--model.init_args.num_classes={base_classes}"] if "baseline" in config.stem else []
    extra += ["--model.init_args.finetune_epochs=2"] if "baseline" in config.stem else []
    cli = ZooCLI(args=["fit", "-c", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}",
                       "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.fast_dev_run=true",
                       "--trainer.enable_model_summary=false", *data, *TINY_EPISODES, *extra])
    assert cli.trainer.global_step == 1  # one real optimizer step
    assert {"test/acc_5way1shot", "test/baseline_pixels_acc_5way1shot"} <= set(cli.trainer.callback_metrics)
