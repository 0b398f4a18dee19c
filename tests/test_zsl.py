"""Zero-shot learning: the xlsa17 reader, Bi-VAEGAN's losses and schedule, the evaluation protocol."""

import numpy as np
import pytest
import torch
from scipy.io import savemat

from datamodules.base import DatasetNotFoundError
from datamodules.generated.zsl_digits import digit_attributes
from datamodules.zsl import DigitsZSLDataModule, ZSLFeatureDataModule, read_xlsa17
from zoo.zsl.attribute_regression import AttributeRegressionZSL, ridge_regression
from zoo.zsl.bi_vaegan import (BiVAEGAN, Generator, adapt_gp_weight, gradient_penalty, kmeans_prior, synthesize,
                               vae_loss, w1_regression_loss)
from zoo.zsl.evaluation import harmonic_mean, per_class_accuracy


def _write_pair(folder, features, labels, att, trainval, test_seen, test_unseen, **res_extra):
    """A hand-made xlsa17 pair: ``features`` (N, d) and 0-based ``labels`` are written as the release stores them."""
    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / "res101.mat", {"features": np.asarray(features, dtype=np.float64).T,
                                    "labels": (np.asarray(labels) + 1).reshape(-1, 1).astype(np.float64), **res_extra})
    savemat(folder / "att_splits.mat", {"att": np.asarray(att, dtype=np.float64).T,
                                        "trainval_loc": (np.asarray(trainval) + 1).reshape(-1, 1).astype(np.float64),
                                        "test_seen_loc": (np.asarray(test_seen) + 1).reshape(-1, 1).astype(np.float64),
                                        "test_unseen_loc": (np.asarray(test_unseen) + 1).reshape(-1, 1).astype(np.float64)})
    return folder


def _toy(tmp_path, d=5):
    # 7 images, 3 classes; d ≠ N so a missing transpose cannot pass
    features = np.arange(7 * d, dtype=np.float64).reshape(7, d) + 1
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    att = np.array([[1.0, 0, 0, 1], [0, 1.0, 0, 1], [0, 0, 1.0, 1]])
    return _write_pair(tmp_path / "TOY", features, labels, att, [0, 2], [1, 3], [4, 5, 6]), features, labels, att


# ---- the xlsa17 reader ------------------------------------------------------------------------------------------


def test_reader_converts_one_based_locations_and_labels_and_transposes(tmp_path):
    folder, features, labels, att = _toy(tmp_path)
    data = read_xlsa17(folder)
    assert data.features.shape == (7, 5) and np.array_equal(data.features, features.astype(np.float32))
    assert np.array_equal(data.labels, labels)  # the file's 1-based labels minus one
    assert data.attributes.shape == (3, 4) and np.array_equal(data.attributes, att.astype(np.float32))
    assert data.trainval_loc.tolist() == [0, 2] and data.test_seen_loc.tolist() == [1, 3]
    assert data.test_unseen_loc.tolist() == [4, 5, 6]  # the file says 5, 6, 7


@pytest.mark.parametrize("damage, message", [
    ("missing_key", "has no key 'test_unseen_loc'"),
    ("location_out_of_range", "outside 1..7"),
    ("label_without_attributes", "no attribute row"),
    ("count_mismatch", "has 7 columns .* but 'labels' has 6"),
])
def test_reader_names_the_file_and_key_of_a_bad_file(tmp_path, damage, message):
    folder, features, labels, att = _toy(tmp_path)
    if damage == "missing_key":
        savemat(folder / "att_splits.mat", {"att": att.T, "trainval_loc": [[1], [3]], "test_seen_loc": [[2]]})
    elif damage == "location_out_of_range":
        _write_pair(folder, features, labels, att, [0, 2], [1, 3], [4, 5, 7])
    elif damage == "label_without_attributes":
        _write_pair(folder, features, [0, 0, 1, 1, 2, 2, 3], att, [0, 2], [1, 3], [4, 5, 6])
    else:
        savemat(folder / "res101.mat", {"features": features.T, "labels": (labels[:6] + 1).reshape(-1, 1)})
    with pytest.raises(ValueError, match=message) as error:
        read_xlsa17(folder)
    assert str(folder) in str(error.value)


def test_missing_dataset_shows_the_expected_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="res101.mat.*\n.*att_splits.mat"):
        ZSLFeatureDataModule(root=str(tmp_path), dataset="CUB").setup()


def test_datamodule_normalises_features_to_the_radius_and_attributes_to_one(tmp_path):
    _toy(tmp_path)
    dm = ZSLFeatureDataModule(root=str(tmp_path), dataset="TOY", radius=5.0)
    dm.setup()
    for features in (dm.train_features, dm.unseen_features, dm.test_seen_set.features):
        assert torch.allclose(features.norm(dim=1), torch.full((len(features),), 5.0), atol=1e-5)
    assert torch.allclose(dm.attributes.norm(dim=1), torch.ones(3), atol=1e-6)
    assert dm.seen_classes.tolist() == [0, 1] and dm.unseen_classes.tolist() == [2]
    generator = Generator(5, 4, 16, 4, radius=5.0)
    out = generator(torch.randn(6, 4), dm.attributes[torch.tensor([0, 1, 2, 0, 1, 2])])
    assert torch.allclose(out.norm(dim=1), torch.full((6,), 5.0), atol=1e-5)


def test_skewed_prior_subsamples_test_unseen_to_the_requested_proportions():
    dm = DigitsZSLDataModule(root="data/zsl_digits", unseen_classes=(2, 4, 7), unseen_prior=[0.6, 0.3, 0.1])
    dm.setup()
    share = dm.unseen_class_counts.double() / dm.unseen_class_counts.sum()
    assert torch.allclose(share, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.01)
    assert len(dm.unseen_features) == dm.unseen_class_counts.sum() > 250  # as many as the smallest class allows


def test_digit_attributes_are_pairwise_distinct():
    att = digit_attributes()
    assert att.shape == (10, 10)
    assert (np.abs(att[:, None] - att[None]).sum(-1) + np.eye(10) > 0).all()


# ---- losses and updates -----------------------------------------------------------------------------------------


def test_gradient_penalty_is_taken_on_the_renormalised_interpolant():
    # D(x) = ½‖x‖² has gradient x: on the sphere of radius 3 every gradient norm is 3, so the penalty is (3−1)² = 4;
    # on the raw chord between two orthogonal points it is shorter, so a penalty that skips the renormalisation differs.
    real = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    fake = torch.tensor([[0.0, 3.0], [3.0, 0.0]])
    critic = lambda x: 0.5 * (x ** 2).sum(1)  # noqa: E731
    assert gradient_penalty(critic, real, fake, radius=3.0).item() == pytest.approx(4.0, abs=1e-5)
    rng = torch.Generator().manual_seed(0)
    alpha = torch.rand(2, 1, generator=torch.Generator().manual_seed(0))
    chord = alpha * real + (1 - alpha) * fake
    expected_raw = ((chord.norm(dim=1) - 1) ** 2).mean()
    assert gradient_penalty(critic, real, fake, radius=None, generator=rng).item() == pytest.approx(expected_raw.item())
    assert expected_raw.item() < 4.0 - 0.1


def test_adaptive_gp_weight_follows_tf_vaegans_rule():
    assert adapt_gp_weight(10.0, 1.2) == pytest.approx(11.0)
    assert adapt_gp_weight(10.0, 0.5) == pytest.approx(10.0 / 1.1)
    assert adapt_gp_weight(10.0, 1.02) == 10.0


def test_w1_regression_loss_on_hand_cases():
    target = torch.tensor([[0.5, 0.5, 0.0]])
    assert w1_regression_loss(target.clone(), target).item() == 0.0
    error = torch.tensor([[0.0, -0.3, 0.0]])
    assert w1_regression_loss(target + error, target).item() == pytest.approx(0.09)  # |e|·e²/|e| = e²
    # two rows, errors (3, 4) and (1, 0): Σ_j e_j² |e_j| / ‖e‖ = (27 + 64) / 5 and 1; mean over the batch
    pred = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert w1_regression_loss(pred, torch.zeros(2, 2)).item() == pytest.approx((91 / 5 + 1) / 2)


def test_vae_loss_divides_the_mse_by_the_batch_twice_as_the_official_code():
    x, recon = torch.zeros(2, 3), torch.ones(2, 3)
    mean, log_var = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    # MSE mean 1, / B = 0.5; KL = −½ Σ(1 + 0 − μ² − 1) / B = ½ · 1 / 2 = 0.25
    assert vae_loss(recon, x, mean, log_var).item() == pytest.approx(0.75)


def test_per_class_accuracy_and_h_on_an_imbalanced_hand_case():
    # class 0: 90 images all right; class 1: 10 images all wrong (predicted 0) -> per-class mean 0.5, not 0.9
    confusion = torch.tensor([[90, 0, 0], [10, 0, 0], [0, 0, 0]])
    assert per_class_accuracy(confusion, torch.tensor([0, 1])).item() == pytest.approx(0.5)
    assert per_class_accuracy(confusion, torch.tensor([0, 1, 2])).item() == pytest.approx(0.5)  # class 2 has no image
    assert harmonic_mean(0.8, 0.4).item() == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_mean(0.0, 0.7).item() == 0.0 and harmonic_mean(0.0, 0.0).item() == 0.0


def test_kmeans_prior_counts_the_clusters_started_from_class_centroids():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]])
    prior = kmeans_prior(features, torch.tensor([[1.0, 1.0], [4.0, 4.0]]))
    assert prior.tolist() == [0.75, 0.25]


def test_ridge_regression_recovers_a_linear_map():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [2.0, 1.0]], dtype=torch.float64)
    weight, bias = ridge_regression(x, x @ w + 0.7, l2=1e-9)
    assert torch.allclose(weight, w, atol=1e-6) and torch.allclose(bias, torch.full((2,), 0.7, dtype=torch.float64), atol=1e-6)


# ---- the module outside a Trainer ---------------------------------------------------------------------------------


def _data(tmp_path_factory=None):
    dm = DigitsZSLDataModule(root="data/zsl_digits", unseen_classes=(2, 4, 7))
    dm.setup()
    return dm


def _model(data, **kw):
    torch.manual_seed(0)
    args = dict(feature_dim=64, attribute_dim=10, hidden=32, attribute_critic_hidden=8, batch_size=16, syn_num=20,
                critic_iter=2, regressor_iter=2, classifier_epochs=3, gzsl_classifier_epochs=2)
    model = BiVAEGAN(**{**args, **kw})
    model.bind_data(data)
    optimizers = model.configure_optimizers()
    model.optimizers = lambda: optimizers  # what Lightning's manual optimisation hands the module
    model.manual_backward = lambda loss: loss.backward()
    return model


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(before, module):
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_each_update_moves_only_its_own_networks():
    model = _model(_data())
    rng = model.rng(0)
    frozen = [model.critic_seen, model.critic_unseen, model.regressor, model.attribute_critic]
    before = [_snapshot(net) for net in frozen]
    g_before = _snapshot(model.generator)
    model.generator_step(rng, transductive=True)
    assert all(_unchanged(b, net) for b, net in zip(before, frozen))
    assert not _unchanged(g_before, model.generator)
    g_before, r_before = _snapshot(model.generator), _snapshot(model.regressor)
    model.critic_step(rng, transductive=True)
    assert _unchanged(g_before, model.generator) and _unchanged(r_before, model.regressor)
    assert not _unchanged(before[0], model.critic_seen) and not _unchanged(before[1], model.critic_unseen)


class _Untouchable(torch.Tensor):
    """A tensor that fails the test when anything reads it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func.__name__ not in ("__get__", "device", "__len__"):
            raise AssertionError(f"the inductive model read the unseen features ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_inductive_training_never_reads_the_unseen_features():
    model = _model(_data(), transductive=False)
    model.unseen_features = model.unseen_features.as_subclass(_Untouchable)
    for _ in range(6):  # iteration 0 and 5 also update the regressor
        model.training_step(None, 0)
    assert int(model.iterations_done) == 6


def test_transductive_training_is_blind_to_the_unseen_labels():
    # The model is given the unseen features and the class histogram only: relabelling test_unseen (same histogram)
    # must leave training bit-identical. A sampler that paired unseen features with labels would change.
    data = _data()
    states = []
    for permute in (False, True):
        if permute:
            labels = data.test_unseen_set.labels
            data.test_unseen_set.labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
        model = _model(data)
        for _ in range(3):
            model.training_step(None, 0)
        states.append(_snapshot(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unseen_attributes_are_drawn_from_unseen_rows_by_the_known_prior():
    data = _data()
    model = _model(data, batch_size=6000)
    a = model.unseen_attribute_batch(torch.Generator().manual_seed(0))
    rows = (a[:, None, :] - data.attributes[None]).abs().sum(-1).argmin(1)
    assert set(rows.unique().tolist()) <= {2, 4, 7}
    counts = torch.stack([(rows == c).sum() for c in (2, 4, 7)]).double()
    expected = data.unseen_class_counts.double() / data.unseen_class_counts.sum() * len(a)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # χ²(2 dof) at p = 0.001


def test_synthesis_is_one_generator_call_and_the_classifier_reads_vha_features():
    model = _model(_data())
    calls = []
    model.generator.register_forward_hook(lambda *args: calls.append(1))
    features, labels = synthesize(model.generator, model.attributes, model.unseen_classes, 50, 10)
    assert len(calls) == 1 and features.shape == (150, 64) and labels.bincount(minlength=10)[[2, 4, 7]].tolist() == [50] * 3
    assert model.classifier_input(features).shape[1] == 64 + 10 + 32  # d + attSize + hidden of R
    no_r = _model(_data(), use_regressor=False)
    assert no_r.classifier_input(features).shape[1] == 64


def test_gzsl_predictions_are_in_the_full_label_space():
    model = _model(_data())
    model.fit_classifiers()
    zsl, gzsl = model.classify(model.train_features[:50])
    assert set(zsl.tolist()) <= {2, 4, 7}
    assert set(gzsl.tolist()) - {2, 4, 7}  # seen images are mostly given seen labels


def test_attribute_regression_baseline_beats_chance_on_pixels():
    data = _data()
    model = AttributeRegressionZSL()
    model.bind_data(data)
    model.fit_classifiers()
    zsl, _ = model.classify(data.test_unseen_set.features)
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((data.test_unseen_set.labels, zsl), torch.ones_like(zsl), accumulate=True)
    assert 0.34 < per_class_accuracy(confusion, data.unseen_classes).item() < 0.6  # the measured floor: 36.8 %


# ---- through the CLI: a real-format fixture, resume, DDP ------------------------------------------------------------


@pytest.mark.parametrize("name, folder, attribute_dim", [("cub", "CUB", 312), ("awa2", "AWA2", 85),
                                                          ("sun", "SUN", 102), ("flo", "FLO", 1024)])
def test_real_data_configs_run_on_an_xlsa17_fixture(tmp_path, name, folder, attribute_dim):
    from conftest import ROOT, run_zoo

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    features = np.abs(rng.normal(size=(30, 2048))) + labels[:, None] * 0.1
    _write_pair(tmp_path / "xlsa17" / folder, features, labels, rng.random((6, attribute_dim)),
                np.flatnonzero(labels < 4)[::2], np.flatnonzero(labels < 4)[1::2], np.flatnonzero(labels >= 4))
    result = run_zoo("fit", "-c", str(ROOT / "configs" / "zsl" / f"bi_vaegan_{name}.yaml"),
                     f"--data.init_args.root={tmp_path / 'xlsa17'}", "--model.init_args.hidden=32",
                     "--model.init_args.syn_num=8", "--trainer.fast_dev_run=true", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/zsl_acc" in result.stdout and "test/gzsl_H" in result.stdout


@pytest.mark.parametrize("name", ["bi_vaegan_digits", "f_vaegan_digits", "f_vaegan_transductive_digits",
                                  "attribute_regression_digits"])
def test_digits_configs_fast_dev_run(tmp_path, name):
    from conftest import ROOT, results_from_stdout, run_zoo

    result = run_zoo("fit", "-c", str(ROOT / "configs" / "zsl" / f"{name}.yaml"), "--trainer.fast_dev_run=true",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = results_from_stdout(result.stdout, "test/")
    assert set(scores) == {"test/zsl_acc", "test/gzsl_U", "test/gzsl_S", "test/gzsl_H"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_predict_writes_both_test_splits_with_zsl_and_gzsl_labels(tmp_path):
    import csv

    from conftest import ROOT, run_zoo

    checkpoint = _fit(tmp_path, "train", "--trainer.max_epochs=1")
    result = run_zoo("predict", "-c", str(ROOT / "configs" / "zsl" / "bi_vaegan_digits.yaml"),
                     "--model.init_args.hidden=32", "--model.init_args.syn_num=20", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'predict'}",
                     f"--ckpt_path={checkpoint}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = result.stdout.split("predictions written to ", 1)[1].split("/ (", 1)[0]  # next to the checkpoint's run
    rows = list(csv.DictReader(open(f"{folder}/predictions.csv")))
    unseen = [r for r in rows if r["split"] == "test_unseen"]
    seen = [r for r in rows if r["split"] == "test_seen"]
    dm = _data()
    assert len(unseen) == len(dm.test_unseen_set) and len(seen) == len(dm.test_seen_set)
    assert {int(r["zsl_pred"]) for r in unseen} <= {2, 4, 7} and {r["zsl_pred"] for r in seen} == {"-1"}
    assert [int(r["label"]) for r in unseen] == dm.test_unseen_set.labels.tolist()  # in split order
    assert {int(r["gzsl_pred"]) for r in seen + unseen} <= set(range(10))


def _fit(tmp_path, name, *extra):
    from conftest import ROOT, run_zoo

    result = run_zoo("fit", "-c", str(ROOT / "configs" / "zsl" / "bi_vaegan_digits.yaml"),
                     "--model.init_args.hidden=32", "--model.init_args.syn_num=20", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", "--trainer.check_val_every_n_epoch=1",
                     "--test_after_fit=false", f"--trainer.default_root_dir={tmp_path / name}", *extra, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name / "version_0" / "checkpoints" / "last.ckpt"


def test_resume_restores_every_network_optimizer_and_the_adaptive_gp_weight(tmp_path):
    straight = torch.load(_fit(tmp_path, "straight", "--trainer.max_epochs=3"), weights_only=False)
    first = _fit(tmp_path, "first", "--trainer.max_epochs=2")
    resumed = torch.load(_fit(tmp_path, "first", "--trainer.max_epochs=3", f"--ckpt_path={first}"),
                         weights_only=False)
    assert len(straight["optimizer_states"]) == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert straight["state_dict"]["gp_weight_seen"] != 10.0  # the adaptive weight moved, and resumed where it was
    for a, b in zip(straight["optimizer_states"], resumed["optimizer_states"]):
        for state_a, state_b in zip(a["state"].values(), b["state"].values()):
            assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])


def test_two_process_evaluation_equals_one_process(tmp_path):
    # One thread in every process: the final classifiers are trained on each rank, and float sums in another thread
    # count could move a borderline image; the sharded confusion matrices must then add up to the same numbers.
    from conftest import ROOT, results_from_stdout, run_zoo

    checkpoint = _fit(tmp_path, "train", "--trainer.max_epochs=1")

    def scores(devices: int) -> dict:
        result = run_zoo("test", "-c", str(ROOT / "configs" / "zsl" / "bi_vaegan_digits.yaml"),
                         "--model.init_args.hidden=32", "--model.init_args.syn_num=20", "--trainer.logger=false",
                         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                         f"--trainer.devices={devices}", *(["--trainer.strategy=ddp"] if devices > 1 else []),
                         f"--trainer.default_root_dir={tmp_path / str(devices)}", f"--ckpt_path={checkpoint}",
                         "--data.init_args.eval_batch_size=64", timeout=400, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return results_from_stdout(result.stdout, "test/")

    one, two = scores(1), scores(2)
    assert set(one) == {"test/zsl_acc", "test/gzsl_U", "test/gzsl_S", "test/gzsl_H"} and set(two) == set(one)
    for name in one:
        assert two[name] == pytest.approx(one[name], abs=1e-6), name


def test_training_runs_under_two_process_ddp(tmp_path):
    checkpoint = _fit(tmp_path, "ddp", "--trainer.max_epochs=1", "--trainer.devices=2", "--trainer.strategy=ddp",
                      "--trainer.accelerator=cpu")
    state = torch.load(checkpoint, weights_only=False)
    assert int(state["state_dict"]["iterations_done"]) == 8  # 16 iterations per epoch, half on each rank
