"""Bi-VAEGAN: Bi-directional Distribution Alignment for Transductive Zero-Shot Learning (Wang et al., CVPR 2023).

Paper: https://arxiv.org/abs/2303.08698 · official code: https://github.com/Zhicaiwww/Bi-VAEGAN (built on TF-VAEGAN).
Provenance: the networks follow ``networks/VAEGANV1_model.py``, the losses ``train.py`` and ``networks/utils.py``,
the final classifier ``classifiers/classifier_ZSL.py``, the hyper-parameters ``scripts/*.sh`` (read at 500ef96; the
zoo's spec, ``shared/specs/zsl_cl_wsss_relabel.md`` §1, lists them with their file). Written for the zoo, not copied.

A conditional VAE-GAN (f-VAEGAN, Xian et al. 2019) synthesises visual features of a class from its attribute vector;
a classifier trained on synthetic features of the unseen classes then recognises their real images. Bi-VAEGAN is
*transductive*: the unlabelled features of the unseen test images are available in training, and it aligns the two
spaces in both directions on them:

* visual space: an **unconditional critic** ``D_u`` on unseen features makes ``G(z, a_u)`` match the unlabelled
  unseen features (the attributes ``a_u`` drawn by the class prior; features and attributes are not paired);
* attribute space: a **regressor** ``R`` (visual → attribute) trained on the seen pairs, an **attribute critic**
  ``D_A`` that makes ``R(x_u)`` of the real unseen features match the unseen attributes, and ``β·L_R(G(z, a_u),
  a_u)``, which asks the generated unseen features to regress back to their own attribute.

Per iteration (official order): every 5th iteration, 5 ``D_A`` steps (transductive) then 5 ``R`` steps; then
``critic_iter`` steps of ``D_s`` (conditional WGAN-GP on seen pairs) and ``D_u``, each gradient penalty taken on the
interpolant **re-normalised to the feature sphere**, with the penalty weights adapted after the loop (TF-VAEGAN's
rule); then one step of ``E`` and ``G``. All six networks use AdamW (betas (0.5, 0.999), weight decay 0.01).

The classifier (§3.4 / TF-VAEGAN's "vha" features) is a linear softmax on ``[x, R(x), h_R(x)]``, trained on
``syn_num`` synthetic features per unseen class (ZSL) or on real seen + synthetic unseen features over all classes
(GZSL). The unseen class prior that draws ``a_u`` is known (the test histogram, the official default), uniform, or
estimated each evaluation: ``cpe`` clusters the unseen features with k-means started from the classifier's class
centroids, ``classifier`` counts its predictions.

Switches give the ablation from configs: ``transductive: false`` (no ``D_u``, ``D_A`` or unseen terms) and
``use_regressor: false`` (no ``R``/``D_A``, classifier on ``x`` alone): both off is inductive f-VAEGAN; transductive
without the regressor is f-VAEGAN with an unseen critic (f-VAEGAN-D², transductive).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo.callbacks import log_images, log_table
from zoo.zsl.evaluation import ZeroShotModule

__all__ = [
    "Encoder", "Generator", "ConditionalCritic", "UnconditionalCritic", "AttributeRegressor", "AttributeCritic",
    "gradient_penalty", "adapt_gp_weight", "w1_regression_loss", "vae_loss", "perturb_attributes", "synthesize",
    "train_linear_classifier", "kmeans_prior", "BiVAEGAN",
]


def _init_normal(module: nn.Module) -> None:
    """The official ``weights_init``: linear weights N(0, 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


def _sphere(x: torch.Tensor, radius: Optional[float]) -> torch.Tensor:
    return x if radius is None else F.normalize(x, dim=-1) * radius


class Encoder(nn.Module):
    """``E(x, a) → (μ, log σ²)`` of the latent code (latent size = attribute size in the official code)."""

    def __init__(self, feature_dim: int, attribute_dim: int, hidden: int, latent_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(feature_dim + attribute_dim, hidden), nn.BatchNorm1d(hidden),
                                  nn.LeakyReLU(0.2))
        self.mean, self.log_var = nn.Linear(hidden, latent_dim), nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([x, a], dim=1))
        return self.mean(h), self.log_var(h)


class Generator(nn.Module):
    """``G(z, a) → x̃``: on the sphere of ``radius`` (``--L2_norm``) or through a sigmoid (``radius=None``)."""

    def __init__(self, feature_dim: int, attribute_dim: int, hidden: int, latent_dim: int,
                 radius: Optional[float]) -> None:
        super().__init__()
        self.radius = radius
        self.net = nn.Sequential(nn.Linear(latent_dim + attribute_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, feature_dim))
        self.apply(_init_normal)

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat([z, a], dim=1))
        return torch.sigmoid(out) if self.radius is None else _sphere(out, self.radius)


class ConditionalCritic(nn.Module):
    """``D_s(x, a)``: the WGAN critic of (feature, attribute) pairs of the seen classes."""

    def __init__(self, feature_dim: int, attribute_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim + attribute_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, a], dim=1)).squeeze(1)


class UnconditionalCritic(nn.Module):
    """``D_u(x)``: the WGAN critic of unlabelled unseen features (the transductive part)."""

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class AttributeRegressor(nn.Module):
    """``R(x)``: visual → attribute (unit norm under ``--L2_norm``); ``embed`` also returns the hidden layer, which
    the final classifier reads ("vha" features)."""

    def __init__(self, feature_dim: int, attribute_dim: int, hidden: int, normalize: bool = True) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(feature_dim, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, attribute_dim)
        self.normalize = normalize
        self.apply(_init_normal)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)
        a = self.out(h)
        return (F.normalize(a, dim=1) if self.normalize else a), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[0]


class AttributeCritic(nn.Module):
    """``D_A(a)``: the WGAN critic in attribute space (real class attributes vs regressed ones)."""

    def __init__(self, attribute_dim: int, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(attribute_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self.apply(_init_normal)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a).squeeze(1)


# ---- losses ----------------------------------------------------------------------------------------------------------


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     radius: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``mean_b (‖∇ D(x̂)‖₂ − 1)²`` at ``x̂ = αx + (1−α)x̃`` (α ~ U(0, 1) per sample), unweighted.

    With ``radius`` the interpolant is put back on the sphere the features live on before the critic sees it (the
    official ``calc_gradient_penalty`` under ``--L2_norm``): a chord between two points of the sphere leaves it, and
    the critic is never shown such points otherwise.
    """
    alpha = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype, generator=generator)
    mixed = _sphere(alpha * real.detach() + (1 - alpha) * fake.detach(), radius).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()


def adapt_gp_weight(weight: float, mean_penalty: float, upper: float = 1.05, lower: float = 1.001,
                    factor: float = 1.1) -> float:
    """TF-VAEGAN's adaptive λ: raise it ×1.1 while the mean ``(‖∇‖−1)²`` of the critic loop exceeds 1.05, lower it
    ÷1.1 once it falls under 1.001, keep it in between."""
    if mean_penalty > upper:
        return weight * factor
    if mean_penalty < lower:
        return weight / factor
    return weight


def w1_regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official ``reconstruct_W1_loss``: ``mean_b Σ_j w_j |e_j|`` with ``e = pred − target`` and
    ``w_j = e_j² / ‖e‖₂``, an L1 loss that weights each dimension by its share of the error."""
    error = pred - target
    weight = error.pow(2) / error.norm(2, dim=1, keepdim=True).clamp_min(1e-12)
    return (weight * error.abs()).sum(1).mean()


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """The official ``loss_fn_2`` (used with ``--L2_norm``): the mean squared error, divided by the batch size once
    more as the code does, plus the KL term to N(0, I) summed and divided by the batch size."""
    batch = x.shape[0]
    reconstruction = F.mse_loss(recon, x) / batch
    kl = -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp()) / batch
    return reconstruction + kl


def perturb_attributes(a: torch.Tensor, scale: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``normalize(a + scale·u⊙a)``, u ~ U(0, 1) per entry (``--perb``: scale 0.1 in the batch samplers, 1 when
    synthesising the classifier's features, as the two official functions do)."""
    noise = torch.rand(a.shape, device=a.device, dtype=a.dtype, generator=generator)
    return F.normalize(a + scale * noise * a, dim=1)


@torch.no_grad()
def synthesize(generator_net: nn.Module, attributes: torch.Tensor, classes: torch.Tensor, num_per_class: int,
               latent_dim: int, perturb: bool = False, rng: Optional[torch.Generator] = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_per_class`` synthetic features of each of ``classes`` in ONE generator call: ``(features, labels)``
    with labels the entries of ``classes``."""
    labels = classes.repeat_interleave(num_per_class)
    a = attributes[labels]
    if perturb:
        a = perturb_attributes(a, 1.0, rng)
    z = torch.randn(len(labels), latent_dim, device=a.device, dtype=a.dtype, generator=rng)
    return generator_net(z, a), labels


def train_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, lr: float,
                            batch_size: int, rng: torch.Generator) -> nn.Linear:
    """The official final classifier: a linear layer (weights N(0, 0.02)) under log-softmax + NLL, Adam (lr,
    betas (0.5, 0.999)), shuffled mini-batches for ``epochs`` epochs; the last epoch's weights are kept (the
    official code keeps the best epoch by test accuracy)."""
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():  # from ``rng``, not the global generator: every DDP rank must fit the same classifier
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=rng, device=rng.device) * 0.02)
        classifier.bias.zero_()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, betas=(0.5, 0.999))
    features = features.detach()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=rng, device=rng.device).to(features.device)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                loss = F.cross_entropy(classifier(features[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return classifier.requires_grad_(False)


def kmeans_prior(features: torch.Tensor, centroids: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """CPE: k-means (Lloyd) of ``features`` from the given ``centroids``; the class prior is the cluster sizes over N
    (cluster ``k`` stands for the class whose centroid started it). An emptied cluster keeps its last centroid."""
    centroids = centroids.clone()
    k = len(centroids)
    assign = torch.cdist(features, centroids).argmin(1)
    for _ in range(iterations):
        counts = torch.bincount(assign, minlength=k).to(features.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, features)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        new_assign = torch.cdist(features, centroids).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return torch.bincount(assign, minlength=k).to(features.dtype) / len(features)


# ---- the LightningModule ---------------------------------------------------------------------------------------------


class BiVAEGAN(ZeroShotModule):
    """Bi-VAEGAN and its ablations (see the module docstring); manual optimisation of up to six networks.

    Data: ``datamodules.zsl.ZSLFeatureDataModule`` (the model reads its tensors in ``setup``; a training batch is only
    an iteration number, the model draws its own random batches: ``critic_iter`` + 1 per iteration, as the official
    loop does). Defaults are CUB's script.

    Args:
        feature_dim / attribute_dim: sizes of the visual features (2048 for res101) and of the attributes.
        hidden: width of E, G, D_s, D_u and R (4096 officially); ``attribute_critic_hidden``: D_A's (100).
        l2_norm / radius: features live on the sphere of ``radius`` (G's output and the GP interpolants are put back
            on it); set them as the datamodule's.
        transductive: train D_u (and D_A) on the unlabelled unseen features; ``ind_epoch`` epochs run inductively first.
        use_regressor: train R (and D_A when transductive) and feed the classifier ``[x, R(x), h_R(x)]``.
        encoded_noise: D_s and G's critic term use the VAE reconstruction ``G(E(x, a), a)`` (CUB/SUN/FLO scripts)
            instead of ``G(z ~ N(0, I), a)`` (AWA).
        perturb: the official ``--perb`` attribute perturbation.
        gamma_*: the loss weights γD, γG, γDu, γGu, γDA, γGA; ``beta`` weighs L_R(G(z, a_u), a_u).
        critic_iter: D_s/D_u steps per generator step; ``regressor_every`` / ``regressor_iter``: R and D_A update
            every that many iterations, that many steps each.
        gp_weight: the initial adaptive λ of D_s and D_u (10); ``attribute_gp_weight``: D_A's fixed λ (0.1).
        lr / betas / weight_decay: AdamW of all six networks.
        batch_size: the batch each step draws (the datamodule's ``batch_size`` sets the iterations per epoch).
        syn_num: synthetic features per unseen class for the final classifier; ``classifier_lr`` /
            ``classifier_epochs`` train it (ZSL), ``gzsl_classifier_lr`` / ``gzsl_classifier_epochs`` the GZSL one.
        prior: the unseen class prior that draws ``a_u``: ``known`` (the test histogram, official default),
            ``uniform``, ``cpe`` (k-means) or ``classifier`` (predicted-label frequencies), the last two re-estimated at
            every evaluation.
        gzsl: also train and score the GZSL classifier.
        seed: seeds the model's own random draws (batches, noise, synthesis); each DDP rank draws differently.
        projection_every: draw the 2-D projection of real vs generated unseen features every that many evaluations
            (0: never).
    """

    def __init__(
        self,
        *,
        feature_dim: int = 2048,
        attribute_dim: int = 312,
        hidden: int = 4096,
        attribute_critic_hidden: int = 100,
        l2_norm: bool = True,
        radius: float = 1.0,
        transductive: bool = True,
        use_regressor: bool = True,
        encoded_noise: bool = True,
        perturb: bool = False,
        gamma_d: float = 10.0,
        gamma_g: float = 10.0,
        gamma_d_unseen: float = 1000.0,
        gamma_g_unseen: float = 10.0,
        gamma_d_att: float = 10.0,
        gamma_g_att: float = 0.1,
        beta: float = 10.0,
        critic_iter: int = 5,
        regressor_every: int = 5,
        regressor_iter: int = 5,
        gp_weight: float = 10.0,
        attribute_gp_weight: float = 0.1,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.01,
        batch_size: int = 64,
        syn_num: int = 400,
        classifier_lr: float = 1e-3,
        classifier_epochs: int = 25,
        gzsl_classifier_lr: float = 1e-3,
        gzsl_classifier_epochs: int = 20,
        prior: str = "known",
        ind_epoch: int = 0,
        gzsl: bool = True,
        seed: int = 0,
        projection_every: int = 1,
    ) -> None:
        super().__init__(gzsl=gzsl)
        if prior not in ("known", "uniform", "cpe", "classifier"):
            raise ValueError(f"prior must be 'known', 'uniform', 'cpe' or 'classifier', got {prior!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        radius_or_none = float(radius) if l2_norm else None
        self.radius = radius_or_none
        latent = attribute_dim
        self.encoder = Encoder(feature_dim, attribute_dim, hidden, latent)
        self.generator = Generator(feature_dim, attribute_dim, hidden, latent, radius_or_none)
        self.critic_seen = ConditionalCritic(feature_dim, attribute_dim, hidden)
        self.critic_unseen = UnconditionalCritic(feature_dim, hidden) if transductive else None
        self.regressor = AttributeRegressor(feature_dim, attribute_dim, hidden, l2_norm) if use_regressor else None
        self.attribute_critic = (AttributeCritic(attribute_dim, attribute_critic_hidden)
                                 if use_regressor and transductive else None)
        # the adaptive penalty weights and the iteration count are state: a resumed run continues them
        self.register_buffer("gp_weight_seen", torch.tensor(float(gp_weight), dtype=torch.float64))
        self.register_buffer("gp_weight_unseen", torch.tensor(float(gp_weight), dtype=torch.float64))
        self.register_buffer("iterations_done", torch.tensor(0, dtype=torch.long))
        self.prior: Optional[torch.Tensor] = None  # over the unseen classes; set from the data, saved in checkpoints
        # the final classifiers are refitted at every evaluation from G and R: not parameters, not in checkpoints
        self.classifiers: dict[str, nn.Linear] = {}
        self._rng: Optional[torch.Generator] = None
        self._evaluations = 0

    # Each backward pass leaves the other networks without gradient (the zoo CLI then runs DDP with
    # find_unused_parameters).
    ddp_find_unused_parameters = True

    # ---- data --------------------------------------------------------------------------------------------------

    def check_dimensions(self, feature_dim: int, attribute_dim: int, num_classes: int) -> None:
        hp = self.hparams
        if (feature_dim, attribute_dim) != (hp.feature_dim, hp.attribute_dim):
            raise ValueError(f"the data has {feature_dim}-d features and {attribute_dim}-d attributes but the model "
                             f"was built for {hp.feature_dim} and {hp.attribute_dim}: set `model.init_args.feature_dim:"
                             f" {feature_dim}` and `model.init_args.attribute_dim: {attribute_dim}`")

    def bind_data(self, data: Any) -> None:
        super().bind_data(data)
        known = self.unseen_class_counts.double() / self.unseen_class_counts.sum()
        self.known_prior = known.float()
        if self.prior is None or len(self.prior) != len(known):
            self.prior = known.float() if self.hparams.prior == "known" else torch.full_like(known.float(), 1 / len(known))

    def _on_device(self) -> None:
        device = self.device
        for name in ("attributes", "seen_classes", "unseen_classes", "train_features", "train_labels",
                     "unseen_features", "prior"):
            value = getattr(self, name)
            if value.device != device:
                setattr(self, name, value.to(device))

    def rng(self, *key: int) -> torch.Generator:
        """The model's generator on its device, reseeded from ``(seed, *key)``: draws depend on the iteration (and
        rank), not on what ran before, so a resumed run draws what the straight run drew."""
        if self._rng is None or self._rng.device != self.device:
            self._rng = torch.Generator(device=self.device)
        seed = int(self.hparams.seed)
        for part in key:
            seed = (seed * 1_000_003 + int(part) + 1) % (2 ** 62)
        return self._rng.manual_seed(seed)

    def _rank(self) -> int:
        return self.trainer.global_rank if self._trainer is not None else 0

    def seen_batch(self, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of labelled seen features and their class attributes (perturbed by 0.1 under ``perturb``)."""
        rows = torch.randint(len(self.train_labels), (self.hparams.batch_size,), device=self.device, generator=rng)
        a = self.attributes[self.train_labels[rows]]
        if self.hparams.perturb:
            a = perturb_attributes(a, 0.1, rng)
        return self.train_features[rows], a

    def unseen_feature_batch(self, rng: torch.Generator) -> torch.Tensor:
        """A random batch of the unlabelled unseen features (no label is drawn: there is none here)."""
        rows = torch.randint(len(self.unseen_features), (self.hparams.batch_size,), device=self.device, generator=rng)
        return self.unseen_features[rows]

    def unseen_attribute_batch(self, rng: torch.Generator) -> torch.Tensor:
        """Unseen class attributes drawn by the prior, independently of any feature batch (the official sampler)."""
        picks = torch.multinomial(self.prior, self.hparams.batch_size, replacement=True, generator=rng)
        a = self.attributes[self.unseen_classes[picks]]
        if self.hparams.perturb:
            a = perturb_attributes(a, 0.1, rng)
        return a

    # ---- optimisation ------------------------------------------------------------------------------------------

    def _networks(self) -> dict[str, Optional[nn.Module]]:
        return {"critic_seen": self.critic_seen, "critic_unseen": self.critic_unseen, "generator": self.generator,
                "encoder": self.encoder, "attribute_critic": self.attribute_critic, "regressor": self.regressor}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for each network that exists, in the official order [D_s, D_u, G, E, D_A, R]."""
        hp = self.hparams
        self._optimizer_names = [name for name, net in self._networks().items() if net is not None]
        return [torch.optim.AdamW(getattr(self, name).parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                  weight_decay=hp.weight_decay) for name in self._optimizer_names]

    def _optimizer(self, name: str) -> Any:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[self._optimizer_names.index(name)]

    def _train_only(self, *names: str) -> None:
        """Gradients for the named networks only (the official ``trainnet``/``freezenet``)."""
        for name, net in self._networks().items():
            if net is not None:
                net.requires_grad_(name in names)

    def _step(self, loss: torch.Tensor, *names: str) -> None:
        optimizers = [self._optimizer(name) for name in names]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()

    def _fake_seen(self, x: torch.Tensor, a: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        if self.hparams.encoded_noise:
            mean, log_var = self.encoder(x, a)
            z = mean + torch.randn(mean.shape, device=x.device, generator=rng) * torch.exp(0.5 * log_var)
        else:
            z = torch.randn(len(a), self.hparams.attribute_dim, device=a.device, generator=rng)
        return self.generator(z, a)

    def _fake_from_noise(self, a: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """``G(z ~ N(0, I), a)``: unseen features for D_u and L_R, seen ones for D_s without ``encoded_noise``."""
        z = torch.randn(len(a), self.hparams.attribute_dim, device=a.device, generator=rng)
        return self.generator(z, a)

    def is_transductive_now(self) -> bool:
        return bool(self.hparams.transductive) and self.current_epoch >= self.hparams.ind_epoch

    def attribute_critic_step(self, rng: torch.Generator) -> dict[str, torch.Tensor]:
        """Maximise γDA·[D_A(a_s) − D_A(R(x_s)) + D_A(a_u) − D_A(R(x_u))] − γDA·0.1·GP, R frozen."""
        hp = self.hparams
        self._train_only("attribute_critic")
        x_s, a_s = self.seen_batch(rng)
        x_u, a_u = self.unseen_feature_batch(rng), self.unseen_attribute_batch(rng)
        with torch.no_grad():
            r_s, r_u = self.regressor(x_s), self.regressor(x_u)
        critic = self.attribute_critic
        wasserstein = critic(a_s).mean() - critic(r_s).mean() + critic(a_u).mean() - critic(r_u).mean()
        penalty = gradient_penalty(critic, torch.cat([a_s, a_u]), torch.cat([r_s, r_u]),
                                   1.0 if hp.l2_norm else None, rng)
        self._step(hp.gamma_d_att * (-wasserstein + hp.attribute_gp_weight * penalty), "attribute_critic")
        return {"d_att_wasserstein": wasserstein.detach()}

    def regressor_step(self, rng: torch.Generator, transductive: bool) -> dict[str, torch.Tensor]:
        """L_R = W1(R(x_s), a_s), minus γGA·[D_A(R(x_s)) + D_A(R(x_u))] when transductive; G and the critics frozen."""
        hp = self.hparams
        self._train_only("regressor")
        x_s, a_s = self.seen_batch(rng)
        loss = regression = w1_regression_loss(self.regressor(x_s), a_s)
        if transductive and self.attribute_critic is not None:
            x_u = self.unseen_feature_batch(rng)
            loss = loss - hp.gamma_g_att * (self.attribute_critic(self.regressor(x_s)).mean()
                                            + self.attribute_critic(self.regressor(x_u)).mean())
        self._step(loss, "regressor")
        return {"regressor_w1": regression.detach()}

    def critic_step(self, rng: torch.Generator, transductive: bool) -> tuple[dict[str, torch.Tensor], float, float]:
        """One D_s (and D_u) update; returns the logs and the raw penalties for the adaptive λ."""
        hp = self.hparams
        self._train_only("critic_seen", "critic_unseen")
        x, a = self.seen_batch(rng)
        with torch.no_grad():
            fake = self._fake_seen(x, a, rng)
        critic = self.critic_seen
        wasserstein = critic(x, a).mean() - critic(fake, a).mean()
        penalty = gradient_penalty(lambda v: critic(v, a), x, fake, self.radius, rng)
        loss = hp.gamma_d * (-wasserstein + float(self.gp_weight_seen) * penalty)
        logs = {"d_seen_wasserstein": wasserstein.detach()}
        penalty_unseen = torch.zeros(())
        names = ["critic_seen"]
        if transductive:
            x_u, a_u = self.unseen_feature_batch(rng), self.unseen_attribute_batch(rng)
            with torch.no_grad():
                fake_u = self._fake_from_noise(a_u, rng)
            critic_u = self.critic_unseen
            wasserstein_u = critic_u(x_u).mean() - critic_u(fake_u).mean()
            penalty_unseen = gradient_penalty(critic_u, x_u, fake_u, self.radius, rng)
            loss = loss + hp.gamma_d_unseen * (-wasserstein_u + float(self.gp_weight_unseen) * penalty_unseen)
            logs["d_unseen_wasserstein"] = wasserstein_u.detach()
            names.append("critic_unseen")
        self._step(loss, *names)
        return logs, float(penalty.detach()), float(penalty_unseen.detach())

    def generator_step(self, rng: torch.Generator, transductive: bool) -> dict[str, torch.Tensor]:
        """L_G = L_VAE − γG·D_s(x̃_s, a_s) [− γGu·D_u(G(z, a_u)) + β·L_R(G(z, a_u), a_u)]; E and G step together."""
        hp = self.hparams
        self._train_only("encoder", "generator")
        x, a = self.seen_batch(rng)
        mean, log_var = self.encoder(x, a)
        z = mean + torch.randn(mean.shape, device=x.device, generator=rng) * torch.exp(0.5 * log_var)
        recon = self.generator(z, a)
        l_vae = vae_loss(recon, x, mean, log_var)
        fake = recon if hp.encoded_noise else self._fake_from_noise(a, rng)
        loss = l_vae - hp.gamma_g * self.critic_seen(fake, a).mean()
        logs = {"vae": l_vae.detach()}
        if transductive:
            a_u = self.unseen_attribute_batch(rng)
            fake_u = self._fake_from_noise(a_u, rng)
            loss = loss - hp.gamma_g_unseen * self.critic_unseen(fake_u).mean()
            if self.regressor is not None:
                cycle = w1_regression_loss(self.regressor(fake_u), a_u)
                loss = loss + hp.beta * cycle
                logs["g_attribute_cycle"] = cycle.detach()
        self._step(loss, "encoder", "generator")
        logs["g_loss"] = loss.detach()
        return logs

    def on_fit_start(self) -> None:
        self._on_device()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        self._on_device()
        iteration = int(self.iterations_done)
        rng = self.rng(iteration, self._rank())
        transductive = self.is_transductive_now()
        logs: dict[str, torch.Tensor] = {}
        if self.regressor is not None and iteration % hp.regressor_every == 0:
            if transductive and self.attribute_critic is not None:
                for _ in range(hp.regressor_iter):
                    logs.update(self.attribute_critic_step(rng))
            for _ in range(hp.regressor_iter):
                logs.update(self.regressor_step(rng, transductive))
        penalties_seen, penalties_unseen = [], []
        for _ in range(hp.critic_iter):
            critic_logs, penalty, penalty_unseen = self.critic_step(rng, transductive)
            logs.update(critic_logs)
            penalties_seen.append(penalty)
            penalties_unseen.append(penalty_unseen)
        # TF-VAEGAN's adaptive λ, on the loop's mean (‖∇‖−1)²; every rank computes it from its own batches, so it is
        # averaged over ranks first to keep the weights identical.
        means = torch.tensor([sum(penalties_seen), sum(penalties_unseen)], dtype=torch.float64,
                             device=self.device) / hp.critic_iter
        means = self.trainer.strategy.reduce(means, reduce_op="mean") if self._trainer is not None else means
        self.gp_weight_seen.fill_(adapt_gp_weight(float(self.gp_weight_seen), float(means[0])))
        if transductive:
            self.gp_weight_unseen.fill_(adapt_gp_weight(float(self.gp_weight_unseen), float(means[1])))
        logs.update(self.generator_step(rng, transductive))
        self._train_only(*self._networks())
        self.iterations_done += 1
        logs.update(gp_weight_seen=self.gp_weight_seen.float(), gp_weight_unseen=self.gp_weight_unseen.float(),
                    gp_mean_seen=means[0].float())
        for name, value in logs.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, prog_bar=name in ("g_loss",))

    # ---- the final classifier and the prior ------------------------------------------------------------------

    def classifier_input(self, x: torch.Tensor) -> torch.Tensor:
        """TF-VAEGAN's "vha" features ``[x, R(x), h_R(x)]`` with the regressor, ``x`` alone without it."""
        if self.regressor is None:
            return x
        with torch.no_grad():
            a, h = self.regressor.embed(x)
        return torch.cat([x, a, h], dim=1)

    def fit_classifiers(self) -> None:
        """Synthesise ``syn_num`` features per unseen class (one batched call), train the ZSL classifier on them and
        the GZSL one on them plus the real seen trainval features; then re-estimate the prior (``cpe`` /
        ``classifier``). Seeded by the epoch, identically on every rank."""
        # Lightning evaluates under inference mode, whose tensors cannot be trained on: leave it for the classifiers.
        with torch.inference_mode(False), torch.no_grad():
            self._fit_classifiers()

    def _fit_classifiers(self) -> None:
        hp = self.hparams
        self._on_device()
        was_training = self.training
        self.eval()
        rng = self.rng(10 ** 9 + self.current_epoch)
        syn_x, syn_y = synthesize(self.generator, self.attributes, self.unseen_classes, hp.syn_num,
                                  hp.attribute_dim, hp.perturb, rng)
        syn_in = self.classifier_input(syn_x)
        to_local = torch.full((len(self.attributes),), -1, dtype=torch.long, device=self.device)
        to_local[self.unseen_classes] = torch.arange(len(self.unseen_classes), device=self.device)
        self.classifiers["zsl"] = train_linear_classifier(syn_in, to_local[syn_y], len(self.unseen_classes),
                                                      hp.classifier_epochs, hp.classifier_lr, hp.syn_num, rng)
        if self.gzsl:
            real_in = self.classifier_input(self.train_features)
            self.classifiers["gzsl"] = train_linear_classifier(
                torch.cat([real_in, syn_in]), torch.cat([self.train_labels, syn_y]), len(self.attributes),
                hp.gzsl_classifier_epochs, hp.gzsl_classifier_lr, hp.syn_num, rng)
        if hp.prior in ("cpe", "classifier"):
            self.prior = self.estimate_prior(syn_in, to_local[syn_y])
        self._synthetic = (syn_x, syn_y)
        self.train(was_training)

    @torch.no_grad()
    def estimate_prior(self, syn_in: torch.Tensor, syn_local: torch.Tensor) -> torch.Tensor:
        """The unseen class prior from the unlabelled unseen features (``hparams.prior``: ``cpe`` or ``classifier``)."""
        features = self.classifier_input(self.unseen_features.float())
        predicted = self.classifiers["zsl"](features).argmax(1)
        k = len(self.unseen_classes)
        if self.hparams.prior == "classifier":
            return torch.bincount(predicted, minlength=k).float() / len(predicted)
        counts = torch.bincount(predicted, minlength=k).float()
        centroids = torch.zeros(k, features.shape[1], device=features.device).index_add_(0, predicted, features)
        synthetic = torch.zeros_like(centroids).index_add_(0, syn_local, syn_in) / torch.bincount(
            syn_local, minlength=k).clamp_min(1)[:, None].float()
        centroids = torch.where(counts[:, None] > 0, centroids / counts.clamp_min(1)[:, None], synthetic)
        return kmeans_prior(features, centroids).float()

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        inputs = self.classifier_input(features)
        zsl = self.unseen_classes.to(features.device)[self.classifiers["zsl"](inputs).argmax(1)]
        gzsl = self.classifiers["gzsl"](inputs).argmax(1) if "gzsl" in self.classifiers else None
        return zsl, gzsl

    # ---- logging ------------------------------------------------------------------------------------------------

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            return
        error = (self.prior.cpu() - self.known_prior.cpu()).abs().sum()
        self.log("val/prior_l1_error", error)
        self._evaluations += 1
        if self.trainer.is_global_zero:
            rows = [[int(c), float(e), float(t)] for c, e, t in
                    zip(self.unseen_classes.tolist(), self.prior.tolist(), self.known_prior.tolist())]
            log_table(self.trainer, "zsl/unseen_prior", ["class", "estimated_or_used", "true"], rows)
            every = self.hparams.projection_every
            if every and self._evaluations % every == 0:
                self._log_projection()

    def _log_projection(self) -> None:
        """A 2-D PCA of the real unseen test features (by true class: evaluation only) and the generated ones."""
        datamodule = getattr(self.trainer, "datamodule", None)
        test_unseen = getattr(datamodule, "test_unseen_set", None)
        if test_unseen is None or not hasattr(self, "_synthetic"):
            return
        real_x, real_y = test_unseen.features.float(), test_unseen.labels.long()
        syn_x, syn_y = (t.cpu() for t in self._synthetic)
        keep = torch.randperm(len(real_x), generator=torch.Generator().manual_seed(0))[:1500]
        real_x, real_y = real_x[keep], real_y[keep]
        syn_keep = torch.randperm(len(syn_x), generator=torch.Generator().manual_seed(0))[:1500]
        syn_x, syn_y = syn_x[syn_keep].float(), syn_y[syn_keep]
        both = torch.cat([real_x, syn_x])
        center = both.mean(0)
        _, _, v = torch.pca_lowrank(both - center, q=2, center=False)
        points = (both - center) @ v[:, :2]
        labels = torch.cat([real_y, syn_y])
        source = ["real"] * len(real_x) + ["generated"] * len(syn_x)
        rows = [[float(p[0]), float(p[1]), int(c), s] for p, c, s in zip(points, labels, source)]
        log_table(self.trainer, "zsl/projection", ["pc1", "pc2", "class", "source"], rows)
        log_images(self.trainer, "zsl/projection", render_scatter(points, labels, torch.tensor(
            [s == "real" for s in source]))[None], ["real (filled) vs generated (ring) unseen features, by class"],
            f"projection/epoch{self.current_epoch:03d}.png")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.prior is not None:
            checkpoint["zsl_unseen_prior"] = self.prior.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "zsl_unseen_prior" in checkpoint:
            self.prior = checkpoint["zsl_unseen_prior"].float()


_PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                         [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]]) / 255.0


def render_scatter(points: torch.Tensor, labels: torch.Tensor, filled: torch.Tensor, size: int = 320) -> torch.Tensor:
    """A ``(3, size, size)`` image in [0, 1]: a dot per point coloured by class, filled or as a ring (no plotting
    library needed; W&B gets the points as a table too)."""
    image = torch.ones(3, size, size)
    low, high = points.min(0).values, points.max(0).values
    pixel = ((points - low) / (high - low).clamp_min(1e-9) * (size - 9) + 4).round().long()
    colours = _PALETTE[labels % len(_PALETTE)]
    dy, dx = torch.meshgrid(torch.arange(-2, 3), torch.arange(-2, 3), indexing="ij")
    ring = (dy.abs() == 2) | (dx.abs() == 2)
    for offset_y, offset_x, on_ring in zip(dy.flatten(), dx.flatten(), ring.flatten()):
        chosen = torch.ones_like(filled) if on_ring else filled
        ys, xs = (size - 1 - pixel[chosen, 1] - offset_y), pixel[chosen, 0] + offset_x
        image[:, ys, xs] = colours[chosen].T
    return image
