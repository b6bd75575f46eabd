"""AVLTC head: Guo, Zhao, Gao, "Look longer to see better: Audio-visual event localization by
exploiting long-term correlation" (audio-visual long-term correlation network: TSGA + PTRF).

Paper -> code
-------------
* AGVA (Tian et al. eq. 2-4), its maps S_map -> :class:`train.heads.layers.AudioGuidedVisualAttention`
* eq. 1-4 (V_fd, V_ft, A_fd, A_ft)           -> :meth:`TimeSpatialGuidedAttention.temporal_weights`
* eq. 5 (T_m = softmax(V_ft + A_ft))         -> :meth:`TimeSpatialGuidedAttention.temporal_weights`
* eq. 6 (V_d = softmax(T_m S_map) V)         -> :meth:`TimeSpatialGuidedAttention.forward`
* Bi-LSTM per modality                       -> ``lstm_audio``, ``lstm_visual``
* eq. 7-10 (C_at, C_vt, C_vh, theta_t)       -> :meth:`PositiveTimeResidualFusion.correlation`
* theta_t = theta_t delta(theta_t)           -> :func:`threshold_correlation`
* eq. 11-13 (V_paf, A_paf, F_paf)            -> :meth:`PositiveTimeResidualFusion.forward`
* classifier of two FC layers                -> ``classifier``
* CE (supervised), average pooling + BCE (weak) -> :meth:`AVLTCHead.loss`

Stated sizes: visual 7x7x512 (S = 49, D_v = 512), audio D_a = 128; c = 2 x event categories
(AVE: 2 x 28 = 56); threshold epsilon = 0.0599 supervised, mean(C_vt C_at) weak; dropout 0.2 in the linear
layers of PTRF; Adam lr 1e-3, batch 128.

Choices where the paper is silent (all in :class:`AVLTCConfig`):

* AGVA keeps the sizes of AVEL's reference code (d = 512, W_v / W_a / W_f without bias) and, like the
  project's avel head, its way of adding the audio term (``agva_audio_term_axis``). The temporal
  selection's hidden size d is the same d = 512 (the paper uses the letter d for both). W_vt, W_at map d to
  T (= ``segments``, 10 on AVE): the head only accepts inputs with exactly ``segments`` segments.
* S_map is AGVA's pre-softmax map x_t (eq. 6 applies its own softmax after mixing with T_m); T_m's softmax
  runs over its last axis, so row t of T_m S_map mixes the maps of all segments (``smap`` option).
* Bi-LSTM hidden size 128 (AVEL's), so d_in = 256 in PTRF.
* eq. 9 reads ``C_vh = BN(tanh(W_ft C_vt + b))`` (the right-hand C_vh is a typo for C_vt); eq. 10 is
  theta_t = softmax(C_at C_vh^T) over its last axis, [T, T] per video; eq. 11 is V_paf = W_vp V_in + theta_t
  (W_ap A_in) and eq. 12 A_paf = W_ap A_in + theta_t^T V_paf (W_vp, W_ap linear, no activation).
* Weak threshold: epsilon = the mean of the entries of C_vt C_at^T of each video (detached), as written.
  Caution: theta_t is a softmax (rows sum to 1) while C_vt C_at^T is an unnormalised product of ReLU
  features, so once those features grow the rule removes every correlation (PTRF then reduces to
  W_vp V_in + W_ap A_in and W_at / W_vt / W_ft receive no gradient). ``mean_threshold_of: theta`` averages
  theta_t instead (1/T); ``threshold_weak`` set to a number uses a fixed threshold;
  ``threshold_supervised: null`` uses the mean rule in the supervised setting (Table III's "mean" column).
* Dropout (0.2) after W_at, W_vt, W_vp, W_ap.
* The classifier is Linear(256, 128) + ReLU + Linear(128, C) (``classifier_hidden``).
* ``train_defaults``: the paper gives Adam, lr 1e-3, batch 128 but no epoch count; 300 as AVEL's.
* Weak loss: the segment logits are averaged over valid segments, then BCE-with-logits against the one-hot
  video label (CMRAN / PSP style). The trainer's ``weak_pool`` argument is ignored (the paper fixes it).

Ablations of Table II: ``spatial_attention`` = tsga | agva, ``ptrf`` = true | false (without PTRF the fused
feature is V_in + A_in). Layers of removed modules are not created.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from train.heads.base import Head, HeadOutput, grid_map
from train.heads.layers import (
    MLP,
    AudioGuidedVisualAttention,
    BiLSTM,
    masked_mean,
    one_hot_targets,
    pool_over_time,
    valid_mask,
)
from train.registry import register_head


@dataclasses.dataclass
class AVLTCConfig:
    """Options of the AVLTC head (defaults: the paper, or the choices in the module doc)."""

    audio_dim: int = 128
    visual_dim: int = 512
    regions: int = 49
    #: T: the temporal selection module maps to T weights per segment (AVE: 10)
    segments: int = 10
    #: AGVA hidden size d (AVEL reference code) and the temporal selection's hidden size d
    agva_hidden: int = 512
    #: AGVA's audio term: "region" (reference code, like the avel head) or "hidden" (eq. 4 as written)
    agva_audio_term_axis: Literal["region", "hidden"] = "region"
    tsga_hidden: int = 512
    #: S_map fed to eq. 6: AGVA's pre-softmax "logits" or its softmax "weights"
    smap: Literal["logits", "weights"] = "logits"
    lstm_hidden: int = 128
    #: c of PTRF; null = 2 x event categories (= 2 x (num_classes - 1))
    correlation_dim: int | None = None
    #: epsilon; null = mean(C_vt C_at) of each video
    threshold_supervised: float | None = 0.0599
    threshold_weak: float | None = None
    #: what the mean rule averages: "product" = the entries of C_vt C_at^T (as written), "theta" = the
    #: entries of theta_t itself (on theta's scale: 1/T, since its rows sum to 1)
    mean_threshold_of: Literal["product", "theta"] = "product"
    ptrf_dropout: float = 0.2
    classifier_hidden: int = 128
    #: Table II ablations
    spatial_attention: Literal["tsga", "agva"] = "tsga"
    ptrf: bool = True


class TimeSpatialGuidedAttention(nn.Module):
    """TSGA (eq. 1-6) or plain AGVA (ablation). forward(audio [B,T,Da], visual [B,T,S,Dv]) ->
    (V_d [B,T,Dv], extras: ``smap`` softmax(S_map) [B,T,S], ``spatial_attention`` [B,T,S],
    ``temporal_weights`` T_m [B,T,T] with TSGA)."""

    def __init__(self, cfg: AVLTCConfig):
        super().__init__()
        self.cfg = cfg
        self.agva = AudioGuidedVisualAttention(cfg.audio_dim, cfg.visual_dim, cfg.agva_hidden, cfg.regions,
                                               cfg.agva_audio_term_axis)
        self.use_tsga = cfg.spatial_attention == "tsga"
        if self.use_tsga:
            self.visual_select = MLP([cfg.visual_dim, cfg.tsga_hidden, cfg.segments], "relu", act_last=True)
            self.audio_select = MLP([cfg.audio_dim, cfg.tsga_hidden, cfg.segments], "relu", act_last=True)

    def temporal_weights(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Eq. 1-5: T_m = softmax(V_ft + A_ft) over the last axis, [B,T,T]."""
        if audio.shape[1] != self.cfg.segments:
            raise ValueError(
                f"avltc: TSGA maps each segment to {self.cfg.segments} temporal weights (W_vt, W_at are "
                f"d x T) but the input has {audio.shape[1]} segments; set heads.avltc.segments to "
                f"{audio.shape[1]} or use heads.avltc.spatial_attention=agva")
        v_ft = self.visual_select(visual.mean(dim=-2))  # V_avg -> V_fd -> V_ft
        a_ft = self.audio_select(audio)  # A -> A_fd -> A_ft
        return (v_ft + a_ft).softmax(dim=-1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.agva.logits(audio, visual)  # [B,T,S]
        smap = x if self.cfg.smap == "logits" else x.softmax(dim=-1)
        extras = {"smap": x.softmax(dim=-1)}
        if self.use_tsga:
            t_m = self.temporal_weights(audio, visual)
            extras["temporal_weights"] = t_m
            smap = t_m @ smap  # T_m S_map
        weights = smap.softmax(dim=-1)
        extras["spatial_attention"] = weights
        return torch.einsum("bts,btsd->btd", weights, visual), extras


def threshold_correlation(theta: torch.Tensor, epsilon: torch.Tensor | float) -> torch.Tensor:
    """theta * delta(theta): keep entries >= epsilon (a number or a [B,1,1] tensor), zero the rest."""
    return theta * (theta >= epsilon).to(theta.dtype)


class PositiveTimeResidualFusion(nn.Module):
    """PTRF (eq. 7-13). forward(V_in [B,T,d], A_in [B,T,d], threshold) -> (F_paf [B,T,d], theta [B,T,T])."""

    def __init__(self, d_in: int, c: int, dropout: float, mean_of: str = "product"):
        super().__init__()
        self.mean_of = mean_of
        self.w_at = nn.Linear(d_in, c)
        self.w_vt = nn.Linear(d_in, c)
        self.w_ft = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)
        self.w_vp = nn.Linear(d_in, d_in)
        self.w_ap = nn.Linear(d_in, d_in)
        self.drop = nn.Dropout(dropout)

    def correlation(self, v_in: torch.Tensor, a_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7-10 -> (theta_t [B,T,T] before the threshold, C_vt C_at^T [B,T,T])."""
        c_at = self.drop(F.relu(self.w_at(a_in)))  # eq. 7
        c_vt = self.drop(F.relu(self.w_vt(v_in)))  # eq. 8
        c_vh = self.bn(torch.tanh(self.w_ft(c_vt)).flatten(0, 1)).unflatten(0, c_vt.shape[:2])  # eq. 9
        theta = (c_at @ c_vh.transpose(1, 2)).softmax(dim=-1)  # eq. 10
        return theta, c_vt @ c_at.transpose(1, 2)

    def forward(self, v_in: torch.Tensor, a_in: torch.Tensor, threshold: float | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        theta, product = self.correlation(v_in, a_in)
        if threshold is None:  # the mean rule, per video, outside the graph (delta has no gradient)
            source = product if self.mean_of == "product" else theta
            threshold = source.detach().mean(dim=(1, 2), keepdim=True)
        theta = threshold_correlation(theta, threshold)
        a_p = self.drop(self.w_ap(a_in))
        v_paf = self.drop(self.w_vp(v_in)) + theta @ a_p  # eq. 11
        a_paf = a_p + theta.transpose(1, 2) @ v_paf  # eq. 12
        return v_paf + a_paf, theta  # eq. 13


@register_head("avltc")
class AVLTCHead(Head):
    """AVLTC (Guo et al.: 78.3%, weak 72.1%): TSGA -> Bi-LSTMs -> PTRF -> two FC layers.

    forward(audio [B,T,128], visual [B,T,7,7,512]) -> HeadOutput(scores [B,T,C] logits, spatial
    [B,T,7,7] (the final map, TSGA's ``spatial_attention``), extras: ``smap`` [B,T,49] (AGVA's softmax map),
    ``temporal_weights`` T_m [B,T,T] (TSGA), ``correlation`` thresholded theta_t [B,T,T] (PTRF)).
    """

    Config = AVLTCConfig
    train_defaults = {"lr": 1e-3, "batch_size": 128, "epochs": 300, "lr_step": None, "lr_gamma": None,
                      "weight_decay": 0.0}

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        self.spatial = TimeSpatialGuidedAttention(cfg)
        self.lstm_audio = BiLSTM(cfg.audio_dim, cfg.lstm_hidden)
        self.lstm_visual = BiLSTM(cfg.visual_dim, cfg.lstm_hidden)
        d_in = 2 * cfg.lstm_hidden
        if cfg.ptrf:
            self.ptrf = PositiveTimeResidualFusion(d_in, self.correlation_dim(), cfg.ptrf_dropout,
                                                   cfg.mean_threshold_of)
        self.classifier = MLP([d_in, cfg.classifier_hidden, num_classes], "relu")

    def correlation_dim(self) -> int:
        """c = 2 x event categories unless configured."""
        c = self.config.correlation_dim
        return 2 * (self.num_classes - 1) if c is None else c

    def threshold(self) -> float | None:
        """epsilon for the current setting (None: the per-video mean of C_vt C_at^T)."""
        return self.config.threshold_weak if self.setting == "weak" else self.config.threshold_supervised

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        v_d, extras = self.spatial(audio, visual.flatten(2, 3))
        spatial = grid_map(extras.pop("spatial_attention"), visual)
        a_in, v_in = self.lstm_audio(audio), self.lstm_visual(v_d)
        if self.config.ptrf:
            fused, extras["correlation"] = self.ptrf(v_in, a_in, self.threshold())
        else:
            fused = v_in + a_in
        return HeadOutput(scores=self.classifier(fused), extras=extras, spatial=spatial)

    def weak_pooling(self, requested: str) -> str:
        """``train.weak_pool`` is ignored: the paper fixes average pooling."""
        return "mean"

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        """Supervised: CE over valid segments. Weak: average-pool the logits over valid segments, BCE
        against the one-hot video label. ``weak_pool`` is ignored (the paper fixes average pooling)."""
        valid = valid_mask(batch, out.scores)
        if self.setting == "weak":
            video = pool_over_time(out.scores, valid, "mean")
            target = one_hot_targets(batch["video_label"], self.num_classes).to(video.device)
            return F.binary_cross_entropy_with_logits(video, target)
        labels = batch["labels"].to(out.scores.device)
        per_segment = F.cross_entropy(out.scores.transpose(1, 2), labels, reduction="none")
        return masked_mean(per_segment, valid)
