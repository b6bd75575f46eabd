"""Cross-modality localization heads (task "cml"): embed audio and visual segments into one space
where matched (synchronized, in-event) pairs are close.

Every CML head has the forward::

    audio  [B, T, 128]          VGGish embedding per 1-s segment
    visual [B, T, 7, 7, 512]    VGG-19 pool5 map per segment (a pre-pooled [B, T, 1, 1, 512]
                                works for heads with ``uses_spatial = False``)
    ->  CmlOutput.audio  [B, S, T, D]   per-stream audio embeddings (S streams, D = 64)
        CmlOutput.visual [B, S, T, D]   per-stream visual embeddings

and is trained with pairs (audio_t, visual_t) of the same segment, ``batch['match']`` [B, T] = 1
inside the event (the two match), 0 elsewhere, ``batch['valid']`` [B, T] masking segments without
features. Inference uses :meth:`CmlHead.distance_matrix` ([B, T, T], audio i vs visual j; the mean
over streams), searched by :mod:`train.cml_metrics`.

Heads:

- ``avdln`` (Tian et al. ECCV 2018, sec. 5; reference ``cmm_train.py``): visual global average
  pool -> Dense(128) -> LeakyReLU(0.3) -> Dense(64); audio Dense(128) -> LeakyReLU(0.3) ->
  Dense(64); Euclidean distance; contrastive loss (Hadsell et al. 2006), margin 2.0; Adam
  lr 1e-3, batch 8 segments, 20 epochs.
- ``dcca`` (Andrew et al. ICML 2013, the baseline of Tian et al. Table 3): the same two MLPs
  trained to maximise the total canonical correlation of matched pairs; after training a linear
  CCA is fitted on the training pairs' embeddings and distances are Euclidean in that CCA space.
- ``coattention-cml`` (Xue et al. TMM 2021, sec. III-D): the CSPA and CSEA blocks of
  :mod:`train.heads.coattention` (reused, not copied), BLSTMs, per stream and modality an MLP
  256 -> 128 -> 64; contrastive loss (tau = 2.0) per stream, lambda_c = 0.6; the distance is the
  mean of the two streams' distances. Optionally initialised from a supervised ``coattention``
  checkpoint (``heads.coattention-cml.init_from``).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..registry import register_head
from .base import Head, grid_map
from .coattention import CoAttentionBlocksConfig, CoSemanticAttention, CoSpatialAttention
from .layers import MLP, BiLSTM

log = logging.getLogger(__name__)

#: Keras' K.epsilon(): the reference clamps squared distances at this before the sqrt, which
#: also keeps the gradient finite at distance 0
DISTANCE_EPS = 1e-7


@dataclasses.dataclass
class CmlOutput:
    #: [B, S, T, D] audio embeddings per stream
    audio: torch.Tensor
    #: [B, S, T, D] visual embeddings per stream
    visual: torch.Tensor
    #: other by-products, each documented by its head
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: [B, T, H, W] the head's spatial map over the visual grid, as :attr:`train.heads.base.HeadOutput.spatial`
    #: (None for heads without one)
    spatial: torch.Tensor | None = None


def euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x - y||_2 over the last axis, as the reference: sqrt(max(sum (x-y)^2, eps))."""
    return ((x - y).pow(2).sum(dim=-1)).clamp_min(DISTANCE_EPS).sqrt()


def pairwise_euclidean(audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """[..., T, D] x [..., T, D] -> [..., T, T] distances, entry (i, j) = audio i vs visual j."""
    return euclidean(audio.unsqueeze(-2), visual.unsqueeze(-3))


def contrastive_loss(distance: torch.Tensor, match: torch.Tensor, margin: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hadsell et al. (2006), Tian et al. eq. 10: mean over pairs of
    ``y d^2 + (1 - y) max(0, margin - d)^2``. ``distance``, ``match`` (0/1) and ``mask`` (pairs
    that count) have one shape."""
    match = match.to(distance.dtype)
    per_pair = match * distance.pow(2) + (1 - match) * (margin - distance).clamp_min(0).pow(2)
    if mask is None:
        return per_pair.mean()
    mask = mask.to(distance.dtype)
    return (per_pair * mask).sum() / mask.sum().clamp_min(1.0)


def glorot_mlp(sizes: Sequence[int], slope: float) -> nn.Sequential:
    """Dense layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with LeakyReLU(``slope``) between
    them (none after the last), initialised like Keras' Dense (Glorot uniform, zero bias)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


def pool_visual(visual: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, C] -> [B, T, C] global average pool (the reference's visual_feature_vec)."""
    if visual.dim() != 5:
        raise ValueError(f"visual must be [B, T, H, W, C], got shape {tuple(visual.shape)}")
    return visual.mean(dim=(2, 3))


class CmlHead(Head):
    """Base of the cross-modality localization heads (see the module docstring for the forward)."""

    task: ClassVar[str] = "cml"
    settings: ClassVar[tuple[str, ...]] = ("supervised",)
    #: False: the head only sees the global average of the visual map, so the task may pre-pool
    #: visual features to [B, T, 1, 1, 512] (identical numbers, 49x less memory)
    uses_spatial: ClassVar[bool] = True
    #: True: segments are independent (no temporal model); the task may train on shuffled
    #: single segments (T = 1 batches), as the reference does for AVDLN
    segment_wise: ClassVar[bool] = False

    def __init__(self, num_classes: int = 0, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> CmlOutput:  # pragma: no cover
        raise NotImplementedError

    def stream_weights(self) -> list[float]:
        """Loss weight of each stream (sums to 1)."""
        return [1.0]

    def pair_distances(self, out: CmlOutput) -> torch.Tensor:
        """[B, S, T] distance between audio t and visual t, per stream."""
        return euclidean(out.audio, out.visual)

    def distance_matrix(self, out: CmlOutput) -> torch.Tensor:
        """[B, T, T] distance between audio segment i and visual segment j, mean over streams."""
        return pairwise_euclidean(out.audio, out.visual).mean(dim=1)

    def loss(self, out: CmlOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        """Weighted sum over streams of the contrastive loss of the (audio t, visual t) pairs.
        ``batch['match']`` [B, T] in {0, 1}; ``batch['valid']`` [B, T] bool (optional)."""
        dist = self.pair_distances(out)
        mask = batch.get("valid")
        total = dist.new_zeros(())
        for s, weight in enumerate(self.stream_weights()):
            total = total + weight * contrastive_loss(dist[:, s], batch["match"], self.config.margin, mask)
        return total

    def predict(self, out: CmlOutput) -> torch.Tensor:
        """CML heads have no per-segment class prediction: localize with :func:`train.cml_metrics.predict_starts`
        on :meth:`distance_matrix`."""
        raise TypeError(f"head {self.name!r} (task cml) predicts window starts: use train.cml_metrics.predict_starts(head.distance_matrix(out), ...)")

    def prepare_eval(self, audio: torch.Tensor, visual: torch.Tensor, match: torch.Tensor, valid: torch.Tensor) -> None:
        """Hook the cml task runs before each evaluation of a segment-wise head, with the training
        pairs: audio [N, T, 128], visual [N, T, H, W, 512], match [N, T], valid [N, T]. Nothing
        for most heads (DCCA fits its linear CCA here)."""


# ---------------------------------------------------------------------------------------------
# AVDLN


@dataclasses.dataclass
class AvdlnConfig:
    """Tian et al. sec. 5 / reference cmm_train.py."""

    #: hidden and output sizes of both embedders (visual 512 -> 128 -> 64, audio 128 -> 128 -> 64)
    hidden: int = 128
    embed: int = 64
    leaky_slope: float = 0.3
    #: contrastive loss margin (th in eq. 10)
    margin: float = 2.0
    audio_dim: int = 128
    visual_dim: int = 512


@register_head("avdln")
class AVDLN(CmlHead):
    """Audio-visual distance learning network: two 2-layer MLPs and a Euclidean distance."""

    Config = AvdlnConfig
    uses_spatial = False
    segment_wise = True
    #: reference cmm_train.py: Keras Adam defaults, batch_size=8, nb_epoch=20 (no decay)
    train_defaults = {"lr": 1e-3, "batch_size": 8, "epochs": 20, "weight_decay": 0.0}

    def __init__(self, num_classes: int = 0, setting: str = "supervised", config: AvdlnConfig | None = None):
        super().__init__(num_classes, setting, config)
        c = self.config
        self.visual_net = glorot_mlp([c.visual_dim, c.hidden, c.embed], c.leaky_slope)
        self.audio_net = glorot_mlp([c.audio_dim, c.hidden, c.embed], c.leaky_slope)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> CmlOutput:
        """audio [B, T, 128], visual [B, T, H, W, 512] -> embeddings [B, 1, T, 64] each."""
        return CmlOutput(
            audio=self.audio_net(audio).unsqueeze(1),
            visual=self.visual_net(pool_visual(visual)).unsqueeze(1),
        )


# ---------------------------------------------------------------------------------------------
# DCCA


@dataclasses.dataclass
class DccaConfig:
    """Deep CCA (Andrew et al. 2013) with AVDLN-sized embedders."""

    hidden: int = 128
    #: output size of both networks (o in Andrew et al.)
    embed: int = 64
    #: canonical components used by the objective and the distance (k <= embed)
    components: int = 64
    leaky_slope: float = 0.3
    #: ridge added to both covariance matrices (r1 = r2 in Andrew et al.)
    reg: float = 1e-3
    audio_dim: int = 128
    visual_dim: int = 512


def _cca_whitened(h1: torch.Tensor, h2: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cholesky factors L1, L2 of the ridged covariances (Σ11 + r I = L1 L1ᵀ, same for view 2)
    and the whitened cross-covariance T = L1⁻¹ Σ12 L2⁻ᵀ of centered views h1, h2 [m, o].

    T has the singular values of Andrew et al.'s Σ11^-1/2 Σ12 Σ22^-1/2 (the canonical
    correlations): L⁻¹ = Q Σ^-1/2 for an orthogonal Q. Triangular solves keep the gradient
    finite where the symmetric square root (eigh) would divide by equal eigenvalues.
    """
    m = h1.shape[0]
    eye = torch.eye(h1.shape[1], dtype=h1.dtype, device=h1.device)
    l1 = torch.linalg.cholesky(h1.T @ h1 / (m - 1) + reg * eye)
    l2 = torch.linalg.cholesky(h2.T @ h2 / (m - 1) + reg * eye)
    s12 = h1.T @ h2 / (m - 1)
    left = torch.linalg.solve_triangular(l1, s12, upper=False)  # L1^-1 Σ12
    t = torch.linalg.solve_triangular(l2, left.T, upper=False).T  # (L2^-1 Σ21 L1^-T)^T
    return l1, l2, t


def cca_correlation(h1: torch.Tensor, h2: torch.Tensor, reg: float, components: int) -> torch.Tensor:
    """Sum of the top ``components`` canonical correlations of views h1, h2 [m, o] (Andrew et al.
    eq. 10: the trace norm of T when components = o). Computed in float64."""
    if h1.shape[0] < 2:
        raise ValueError("the CCA objective needs at least 2 matched pairs in a batch")
    h1 = h1.double() - h1.double().mean(dim=0, keepdim=True)
    h2 = h2.double() - h2.double().mean(dim=0, keepdim=True)
    if reg <= 0 and h1.shape[0] <= h1.shape[1]:
        raise ValueError(f"without a ridge the CCA objective needs more than {h1.shape[1]} pairs, got {h1.shape[0]}")
    _, _, t = _cca_whitened(h1, h2, reg)
    return torch.linalg.svdvals(t)[:components].sum()


@register_head("dcca")
class DCCA(CmlHead):
    """Deep CCA baseline: two MLPs maximising the canonical correlation of matched pairs; the
    distance is Euclidean between the top-k canonical variates of a linear CCA fitted on the
    training pairs' embeddings (:meth:`prepare_eval`; before that, in the raw embedding space)."""

    Config = DccaConfig
    uses_spatial = False
    segment_wise = True
    #: not given by Tian et al.; large batches so that each holds enough matched pairs for the
    #: covariance estimates (Andrew et al. use full-batch L-BFGS)
    train_defaults = {"lr": 1e-3, "batch_size": 512, "epochs": 30, "weight_decay": 0.0}

    def __init__(self, num_classes: int = 0, setting: str = "supervised", config: DccaConfig | None = None):
        super().__init__(num_classes, setting, config)
        c = self.config
        if not 0 < c.components <= c.embed:
            raise ValueError(f"heads.dcca.components must lie in 1..embed={c.embed}, got {c.components}")
        self.visual_net = glorot_mlp([c.visual_dim, c.hidden, c.embed], c.leaky_slope)
        self.audio_net = glorot_mlp([c.audio_dim, c.hidden, c.embed], c.leaky_slope)
        # linear CCA fitted after training (saved with the weights)
        self.register_buffer("audio_mean", torch.zeros(c.embed))
        self.register_buffer("visual_mean", torch.zeros(c.embed))
        self.register_buffer("audio_proj", torch.eye(c.embed)[:, : c.components].clone())
        self.register_buffer("visual_proj", torch.eye(c.embed)[:, : c.components].clone())
        self.register_buffer("cca_fitted", torch.zeros((), dtype=torch.bool))

    def embed(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs (before the linear CCA): [..., 64] each."""
        return self.audio_net(audio), self.visual_net(pool_visual(visual))

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> CmlOutput:
        """audio [B, T, 128], visual [B, T, H, W, 512] -> canonical variates [B, 1, T, k] each
        (raw network outputs in ``extras['audio_raw'/'visual_raw']`` [B, T, 64])."""
        a, v = self.embed(audio, visual)
        za = (a - self.audio_mean) @ self.audio_proj
        zv = (v - self.visual_mean) @ self.visual_proj
        return CmlOutput(audio=za.unsqueeze(1), visual=zv.unsqueeze(1), extras={"audio_raw": a, "visual_raw": v})

    def loss(self, out: CmlOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        """Negative total canonical correlation of the matched, valid pairs of the batch."""
        keep = batch["match"] > 0.5
        if "valid" in batch:
            keep = keep & batch["valid"].bool()
        a, v = out.extras["audio_raw"][keep], out.extras["visual_raw"][keep]
        if a.shape[0] < 2:
            return out.extras["audio_raw"].sum() * 0.0  # no usable pair: zero loss, graph kept
        c = self.config
        return -cca_correlation(a, v, c.reg, c.components).to(a.dtype)

    @torch.no_grad()
    def fit_cca(self, audio_raw: torch.Tensor, visual_raw: torch.Tensor) -> torch.Tensor:
        """Fit the linear CCA on matched network outputs [N, 64] each; returns the canonical
        correlations [k] of that fit."""
        c = self.config
        a, v = audio_raw.double(), visual_raw.double()
        ma, mv = a.mean(dim=0), v.mean(dim=0)
        l1, l2, t = _cca_whitened(a - ma, v - mv, c.reg)
        u, s, vh = torch.linalg.svd(t)
        # canonical directions: W1 = L1^-T U_k, W2 = L2^-T V_k (so that W1ᵀ Σ11 W1 = I)
        w1 = torch.linalg.solve_triangular(l1.T, u[:, : c.components], upper=True)
        w2 = torch.linalg.solve_triangular(l2.T, vh.T[:, : c.components], upper=True)
        self.audio_mean.copy_(ma.float())
        self.visual_mean.copy_(mv.float())
        self.audio_proj.copy_(w1.float())
        self.visual_proj.copy_(w2.float())
        self.cca_fitted.fill_(True)
        return s[: c.components].float()

    @torch.no_grad()
    def prepare_eval(self, audio: torch.Tensor, visual: torch.Tensor, match: torch.Tensor, valid: torch.Tensor) -> None:
        """Fit the linear CCA on the matched, valid training pairs (shapes: :meth:`CmlHead.prepare_eval`)."""
        keep = (match > 0.5) & valid.bool()
        a, v = self.embed(audio, visual)
        corr = self.fit_cca(a[keep], v[keep])
        log.info("dcca: linear CCA on %d training pairs, mean canonical correlation %.3f", int(keep.sum()), float(corr.mean()))


# ---------------------------------------------------------------------------------------------
# co-attention matching (Xue et al. TMM 2021, sec. III-D)


@dataclasses.dataclass
class CoAttentionCmlConfig:
    """Xue et al. sec. III-D: the co-attention model of the event head, then per stream and
    modality an MLP 256 -> 128 -> 64 into the matching space."""

    #: the CSPA / CSEA blocks and BLSTMs (:class:`train.heads.coattention.CoAttentionBlocksConfig`:
    #: the event head's options without its classifiers and losses, which this head does not have)
    attention: CoAttentionBlocksConfig = dataclasses.field(default_factory=CoAttentionBlocksConfig)
    #: the matching MLP "two fully connected layers with output sizes 128 and 64"
    match_hidden: int = 128
    embed: int = 64
    #: activation between the two matching layers (the paper is silent)
    match_activation: str = "relu"
    #: contrastive threshold tau and the CSPA stream's weight lambda_c
    margin: float = 2.0
    lambda_c: float = 0.6
    #: a checkpoint of the supervised ``coattention`` head (safetensors, avel-train output) whose
    #: CSPA/CSEA blocks and BLSTMs initialise this head ("" = random init). Relative paths are
    #: resolved against the pipeline's folder by the cml task.
    init_from: str = ""


class MatchingStream(nn.Module):
    """One stream after its attention block: BLSTMs (eq. 4, named like the event head's
    ``Stream`` so its weights load) and the matching MLPs (Fig. 2(b)).
    forward(audio [B,T,Ca], visual [B,T,Cv]) -> (m^a [B,T,D], m^v [B,T,D])."""

    def __init__(self, cfg: CoAttentionCmlConfig):
        super().__init__()
        att = cfg.attention
        self.lstm_a = BiLSTM(att.audio_dim, att.lstm_hidden)
        self.lstm_v = BiLSTM(att.visual_dim, att.lstm_hidden)
        sizes = [2 * att.lstm_hidden, cfg.match_hidden, cfg.embed]
        self.match_a = MLP(sizes, cfg.match_activation)
        self.match_v = MLP(sizes, cfg.match_activation)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.match_a(self.lstm_a(audio)), self.match_v(self.lstm_v(visual))


#: state-dict prefixes taken from a supervised co-attention checkpoint (its classifiers are not)
INIT_PREFIXES = ("cspa.", "csea.", "stream_cspa.lstm_", "stream_csea.lstm_")


@register_head("coattention-cml")
class CoAttentionMatching(CmlHead):
    """Co-attention matching: CSPA and CSEA streams (blocks of :mod:`train.heads.coattention`),
    BLSTMs, matching MLPs; loss lambda_c L^C1 + (1 - lambda_c) L^C2 (contrastive, tau = 2.0);
    inference distance = mean of the two streams' distances.

    forward(audio [B,T,128], visual [B,T,7,7,512]) -> CmlOutput(audio, visual [B, S, T, 64]) with
    S = 2 streams (CSPA first, CSEA second; 1 for the ``attention.streams`` ablations), spatial:
    CSPA's Z^v_att [B,T,7,7] (None without CSPA). The whole video goes through the model: the BLSTMs see
    all T segments and the co-attention of segment t uses both modalities of segment t.
    """

    Config = CoAttentionCmlConfig
    #: Xue et al. sec. IV-A: Adam lr 1e-3, 30 epochs, batch 32 (videos) for the CML task
    train_defaults = {"lr": 1e-3, "batch_size": 32, "epochs": 30, "weight_decay": 0.0}

    def __init__(self, num_classes: int = 0, setting: str = "supervised", config: CoAttentionCmlConfig | None = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        if not 0.0 <= cfg.lambda_c <= 1.0:
            raise ValueError(f"heads.{self.name}.lambda_c must lie in [0, 1], got {cfg.lambda_c}")
        self.use_cspa = cfg.attention.streams in ("both", "cspa")
        self.use_csea = cfg.attention.streams in ("both", "csea")
        if self.use_cspa:
            self.cspa = CoSpatialAttention(cfg.attention)
            self.stream_cspa = MatchingStream(cfg)
        if self.use_csea:
            self.csea = CoSemanticAttention(cfg.attention)
            self.stream_csea = MatchingStream(cfg)

    def stream_weights(self) -> list[float]:
        if self.use_cspa and self.use_csea:
            return [self.config.lambda_c, 1.0 - self.config.lambda_c]
        return [1.0]

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> CmlOutput:
        grid = visual
        visual = visual.flatten(2, 3)  # [B,T,H*W,C]
        audios, visuals, spatial = [], [], None
        if self.use_cspa:
            spa = self.cspa(audio, visual)
            ma, mv = self.stream_cspa(spa["audio"], spa["visual"])
            audios.append(ma)
            visuals.append(mv)
            spatial = grid_map(spa["spatial"], grid)
        if self.use_csea:
            sem = self.csea(audio, visual)
            ma, mv = self.stream_csea(sem["audio"], sem["visual"])
            audios.append(ma)
            visuals.append(mv)
        return CmlOutput(audio=torch.stack(audios, dim=1), visual=torch.stack(visuals, dim=1), spatial=spatial)

    def init_from_checkpoint(self, path: str | Path) -> list[str]:
        """Copy the CSPA/CSEA blocks and BLSTMs of a supervised ``coattention`` checkpoint into
        this head (Xue et al.: "we initialize the co-attention model and the LSTM network with
        parameters learned from the MMEL task"). Returns the loaded keys. Raises
        :class:`train.checkpoint.CheckpointError` naming the file when the checkpoint is of
        another head or lacks / misfits one of these tensors."""
        from ..checkpoint import CheckpointError, load_checkpoint

        state, meta = load_checkpoint(path)
        if meta.get("head") != "coattention":
            raise CheckpointError(
                f"{path}: heads.{self.name}.init_from needs a checkpoint of the 'coattention' head, "
                f"this one is of {meta.get('head')!r}"
            )
        own = self.state_dict()
        wanted = [k for k in own if k.startswith(INIT_PREFIXES)]
        missing = [k for k in wanted if k not in state]
        misfit = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wanted
                  if k in state and state[k].shape != own[k].shape]
        if missing or misfit:
            raise CheckpointError(
                f"{path}: does not fit heads.{self.name} (train the coattention head with the same "
                f"attention options): missing {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                f"shape mismatch {misfit[:5]}"
            )
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        log.info("%s: initialised %d tensors from %s", self.name, len(wanted), path)
        return wanted
