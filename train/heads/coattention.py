"""Co-attention head: Xue, Zhong, Cai, Chen, Wang, "Audio-Visual Event Localization by Learning
Spatial and Semantic Co-Attention", IEEE TMM 2021 (multimodal event localization, SEL and WSEL).

Paper -> code
-------------
* eq. 1 (Hadamard fusion in a common space, visual spatial attention)  -> :meth:`CoSpatialAttention.forward`
  (``f1``, ``f2``, ``f3``)
* eq. 2 (visual-guided audio attention with residual; attended visual)  -> :meth:`CoSpatialAttention.forward`
  (``f4``, ``f5``)
* eq. 3 (cross-modal mapping a->v, v->a; semantic attention with +1 residual) -> :meth:`CoSemanticAttention.forward`
* eq. 4 (BLSTMs per modality and stream)                                -> ``lstm_a1, lstm_v1, lstm_a2, lstm_v2``
* Fig. 2(c) MLP 64 -> 29 on cat(L^a, L^v) per stream                    -> ``classifier_cspa``, ``classifier_csea``
* eq. 6 / eq. 7 (multilabel soft-margin; weak: max over time) and the
  lambda_s / lambda_w combination                                       -> :meth:`CoAttentionHead.loss`
* "the model averages the outputs of the CSPA and CSEA streams"         -> ``HeadOutput.scores``

Sizes (Section IV-A and Table I): C_a1 = 128, C_v1 = 512, C_a2 = C_v2 = H x W = 49;
FC1 128->512->49, FC2 512->512->49, FC3 49->1, FC4 49->256->49, FC5 49->128, FC_v2a 512->128,
FC_a2v 128->512, FC6 128->128, FC7 512->512; BLSTM hidden 128 (output 256) for both modalities.

Choices where the paper is silent (all in :class:`CoAttentionConfig` / :class:`CoAttentionBlocksConfig`):

* ``activation`` (relu): between the two layers of FC1/FC2/FC4 and after FC1/FC2 (the embeddings into the
  common space, like the "dense layer with nonlinearity" of AVEL's attention), and after FC_a2v / FC_v2a.
  FC3, FC4's output, FC5, FC6, FC7 are linear (they feed a softmax or a residual sum).
* ``F^av (x) Z`` of eq. 2 contracts the spatial axis: F^av is [H*W, C_v2] and Z is [H*W, 1], so the product
  is the Z-weighted sum of F^av's rows, a C_v2 = 49 vector, which FC4 maps to the audio attention.
* In eq. 3, ``F_t^v`` is the globally average-pooled visual feature G(F_t^v) (512): the CSEA stream works on
  semantic (channel) vectors and its BLSTM takes a 512-vector. The softmaxes of eq. 3 run over channels.
* The classifier MLP (Fig. 2(c): 64 then 29) has a ReLU between its layers.
* eq. 6 sums over segments; here the loss is averaged over valid segments (a constant factor T).
* The trainer's ``weak_pool`` argument is ignored: the paper fixes the pooling (``weak_pool`` option, max).

Ablations of Table V: ``streams`` = both | cspa | csea; ``audio_attention`` = false gives (CSPA /aa);
``semantic_branches`` = both | a2v | v2a gives CSPA + (CSEA /v2a) (only the a->v mapping and the visual
attention) or CSPA + (CSEA /a2v). Layers of removed branches are not created.
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
    BiLSTM,
    masked_mean,
    pool_over_time,
    one_hot_targets,
    valid_mask,
)
from train.registry import register_head


@dataclasses.dataclass
class CoAttentionBlocksConfig:
    """Options of the CSPA / CSEA blocks and BLSTMs (defaults: the paper); shared by the event
    head (:class:`CoAttentionConfig`) and the matching head ``coattention-cml``."""

    #: raw feature sizes C_a1 (VGGish) and C_v1 (VGG-19 channels); spatial size H*W = C_a2 = C_v2
    audio_dim: int = 128
    visual_dim: int = 512
    regions: int = 49
    #: Table I hidden sizes: FC1/FC2 hidden (512), FC4 hidden (256)
    fc12_hidden: int = 512
    fc4_hidden: int = 256
    #: BLSTM hidden size (output 2x)
    lstm_hidden: int = 128
    #: activation of the hidden/embedding FC layers (paper silent)
    activation: str = "relu"
    #: Table V ablations
    streams: Literal["both", "cspa", "csea"] = "both"
    audio_attention: bool = True
    semantic_branches: Literal["both", "a2v", "v2a"] = "both"


@dataclasses.dataclass
class CoAttentionConfig(CoAttentionBlocksConfig):
    """Options of the co-attention event head: the blocks plus its classifiers and losses."""

    #: Fig. 2(c): the per-stream classifier's hidden size (then C classes)
    classifier_hidden: int = 64
    #: lambda_s (supervised) / lambda_w (weak): weight of the CSPA stream's loss
    lambda_supervised: float = 0.3
    lambda_weak: float = 0.7
    #: weak MIL pooling over time of the segment scores (paper: global max pooling)
    weak_pool: Literal["max", "mean"] = "max"


class CoSpatialAttention(nn.Module):
    """CSPA (eq. 1-2). forward(audio [B,T,Ca], visual [B,T,R,Cv]) -> dict with
    ``audio`` F^a_spa [B,T,Ca], ``visual`` F^v_spa [B,T,Cv], ``spatial`` Z^v_att [B,T,R],
    ``audio_att`` Z^a_att [B,T,R] (when the audio attention exists)."""

    def __init__(self, cfg: CoAttentionBlocksConfig):
        super().__init__()
        act, r = cfg.activation, cfg.regions
        self.f1 = MLP([cfg.audio_dim, cfg.fc12_hidden, r], act, act_last=True)
        self.f2 = MLP([cfg.visual_dim, cfg.fc12_hidden, r], act, act_last=True)
        self.f3 = nn.Linear(r, 1)
        self.audio_attention = cfg.audio_attention
        if self.audio_attention:
            self.f4 = MLP([r, cfg.fc4_hidden, r], act)
            self.f5 = nn.Linear(r, cfg.audio_dim)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        fa = self.f1(audio)  # [B,T,R]   f1(F^a)
        f_av = fa.unsqueeze(-2) * self.f2(visual)  # [B,T,R(spatial),R]  eq. 1 F^av
        z = self.f3(f_av).squeeze(-1)  # [B,T,R]  Z
        z_att = z.softmax(dim=-1)  # Z^v_att over the spatial positions
        out = {"visual": torch.einsum("btr,btrc->btc", z_att, visual), "spatial": z_att}  # F^v (x) Z_att^T
        if self.audio_attention:
            pooled = torch.einsum("btr,btrc->btc", z, f_av)  # F^av (x) Z: [B,T,R]
            za_att = self.f4(pooled).softmax(dim=-1)
            out["audio"] = self.f5(za_att * fa) + audio  # eq. 2 with the residual
            out["audio_att"] = za_att
        else:
            out["audio"] = audio  # (CSPA /aa): no visual-guided audio attention
        return out


class CoSemanticAttention(nn.Module):
    """CSEA (eq. 3). forward(audio [B,T,Ca], visual [B,T,R,Cv]) -> dict with ``audio`` F^a_sem
    [B,T,Ca], ``visual`` F^v_sem [B,T,Cv] and the attentions ``audio_sem`` / ``visual_sem``."""

    def __init__(self, cfg: CoAttentionBlocksConfig):
        super().__init__()
        act = cfg.activation
        self.use_v2a = cfg.semantic_branches in ("both", "v2a")
        self.use_a2v = cfg.semantic_branches in ("both", "a2v")
        if self.use_v2a:
            self.f_v2a = MLP([cfg.visual_dim, cfg.audio_dim], act, act_last=True)
            self.f6 = nn.Linear(cfg.audio_dim, cfg.audio_dim)
        if self.use_a2v:
            self.f_a2v = MLP([cfg.audio_dim, cfg.visual_dim], act, act_last=True)
            self.f7 = nn.Linear(cfg.visual_dim, cfg.visual_dim)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = visual.mean(dim=-2)  # G(F^v): [B,T,Cv]
        out = {"audio": audio, "visual": pooled}
        if self.use_v2a:
            att = self.f6(audio * self.f_v2a(pooled)).softmax(dim=-1)
            out["audio"], out["audio_sem"] = (att + 1) * audio, att
        if self.use_a2v:
            att = self.f7(pooled * self.f_a2v(audio)).softmax(dim=-1)
            out["visual"], out["visual_sem"] = (att + 1) * pooled, att
        return out


class Stream(nn.Module):
    """One stream after its attention module: BLSTMs (eq. 4) and the classifier MLP (Fig. 2(c)).
    forward(audio [B,T,Ca], visual [B,T,Cv]) -> scores e_t [B,T,C]."""

    def __init__(self, cfg: CoAttentionConfig, num_classes: int):
        super().__init__()
        self.lstm_a = BiLSTM(cfg.audio_dim, cfg.lstm_hidden)
        self.lstm_v = BiLSTM(cfg.visual_dim, cfg.lstm_hidden)
        self.classifier = MLP([4 * cfg.lstm_hidden, cfg.classifier_hidden, num_classes], "relu")

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([self.lstm_a(audio), self.lstm_v(visual)], dim=-1))


@register_head("coattention")
class CoAttentionHead(Head):
    """Co-attention (Xue et al. TMM 2021: 76.5%, weak 70.2%): CSPA + CSEA streams.

    Co-spatial + co-semantic attention, two BLSTM streams, averaged scores.

    forward(audio [B,T,128], visual [B,T,7,7,512]) -> HeadOutput(scores [B,T,C] = mean of the streams'
    scores, spatial = CSPA's Z^v_att [B,T,7,7] (None without CSPA), extras: ``scores_cspa`` / ``scores_csea``
    [B,T,C], ``audio_attention`` Z^a_att [B,T,49], ``audio_semantic`` [B,T,128], ``visual_semantic`` [B,T,512]
    (each when its branch exists)).
    """

    Config = CoAttentionConfig
    train_defaults = {"lr": 1e-3, "batch_size": 64, "epochs": 300, "lr_step": None, "lr_gamma": None,
                      "weight_decay": 0.0}

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        self.use_cspa = cfg.streams in ("both", "cspa")
        self.use_csea = cfg.streams in ("both", "csea")
        if self.use_cspa:
            self.cspa = CoSpatialAttention(cfg)
            self.stream_cspa = Stream(cfg, num_classes)
        if self.use_csea:
            self.csea = CoSemanticAttention(cfg)
            self.stream_csea = Stream(cfg, num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        grid = visual
        visual = visual.flatten(2, 3)  # [B,T,H*W,C]
        extras: dict[str, torch.Tensor] = {}
        streams, spatial = [], None
        if self.use_cspa:
            spa = self.cspa(audio, visual)
            extras["scores_cspa"] = self.stream_cspa(spa["audio"], spa["visual"])
            spatial = grid_map(spa["spatial"], grid)
            if "audio_att" in spa:
                extras["audio_attention"] = spa["audio_att"]
            streams.append(extras["scores_cspa"])
        if self.use_csea:
            sem = self.csea(audio, visual)
            extras["scores_csea"] = self.stream_csea(sem["audio"], sem["visual"])
            for key, name in (("audio_sem", "audio_semantic"), ("visual_sem", "visual_semantic")):
                if key in sem:
                    extras[name] = sem[key]
            streams.append(extras["scores_csea"])
        return HeadOutput(scores=torch.stack(streams).mean(0), extras=extras, spatial=spatial)

    def stream_weight(self) -> float:
        """lambda of the CSPA stream for the current setting (lambda_s or lambda_w)."""
        return self.config.lambda_weak if self.setting == "weak" else self.config.lambda_supervised

    def weak_pooling(self, requested: str) -> str:
        """``train.weak_pool`` is ignored: heads.coattention.weak_pool decides."""
        return self.config.weak_pool

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        """L^S = lambda_s L^S1 + (1 - lambda_s) L^S2 (eq. 6) or L^W = lambda_w L^W1 + (1 - lambda_w) L^W2
        (eq. 7); with a single stream, that stream's loss. ``weak_pool`` is ignored (see module doc)."""
        valid = valid_mask(batch, out.scores)
        if self.setting == "weak":
            target = one_hot_targets(batch["video_label"], self.num_classes).to(out.scores.device)
            stream_loss = lambda e: soft_margin_weak(e, target, valid, self.config.weak_pool)  # noqa: E731
        else:
            target = one_hot_targets(batch["labels"], self.num_classes).to(out.scores.device)
            stream_loss = lambda e: soft_margin_segments(e, target, valid)  # noqa: E731
        if self.use_cspa and self.use_csea:
            lam = self.stream_weight()
            return lam * stream_loss(out.extras["scores_cspa"]) + (1 - lam) * stream_loss(out.extras["scores_csea"])
        return stream_loss(out.scores)


def soft_margin_segments(scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 6: multilabel soft-margin loss of segment scores [B,T,C] against one-hot targets [B,T,C],
    -1/C sum_j [y log sigmoid(e) + (1-y) log sigmoid(-e)], averaged over valid segments."""
    per_segment = -(target * F.logsigmoid(scores) + (1 - target) * F.logsigmoid(-scores)).mean(-1)
    return masked_mean(per_segment, valid)


def soft_margin_weak(scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pool: str) -> torch.Tensor:
    """Eq. 7: v[i] = max_t e_t[i] over valid segments (or the mean when ``pool`` = mean), then the
    multilabel soft-margin loss against the video's one-hot label [B,C]."""
    if pool == "max":
        video = pool_over_time(scores, valid, "max")
    elif pool == "mean":
        video = pool_over_time(scores, valid, "mean")
    else:
        raise ValueError(f"heads.coattention.weak_pool must be 'max' or 'mean', got {pool!r}")
    return F.multilabel_soft_margin_loss(video, target)
