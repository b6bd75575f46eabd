"""BMFN head: Liu, Quan, Liu, Yan, "Bi-Directional Modality Fusion Network for Audio-Visual Event
Localization", ICASSP 2022. Public code: github.com/weizequan/BMFN (read for facts; that code builds the
expansion layers of its ESA inside forward(), i.e. new random layers on every call; here every layer is
created once in ``__init__``).

Paper -> code
-------------
* eq. 1 (visual channel attention M^C then spatial attention M^S -> v^E)  -> :class:`VisualAttention`
* eq. 2 (MFB: rise-dimension to d_m, product, dropout, sum-pooling k, power + L2 norm) ->
  :meth:`AudioVisualFusionAttention.mfb`, :func:`train.heads.layers.mfb_pool`
* eq. 3 (attentive weights W_t, channel W^C, spatial W^S -> av_t)        -> :meth:`AudioVisualFusionAttention.forward`
* eq. 4 (expansion self-attention ESA: Att^ = BN(W8 delta(BN(W7 Att))), B = (Att^ + Att) V^)
    -> :class:`AttentionExpansion`, :class:`EncoderLayer`
* eq. 5 (normal self-attention NSA, transformer encoder)               -> :class:`EncoderLayer`
* self-attention blocks (ESA then NSA) on v^E, a_t, av_t               -> :class:`SelfAttentionBlock`
* eq. 6 (forward attention FA_1, FA_2; backward attention BA_1, BA_2)  -> :class:`CrossAttentionBlock`
* eq. 7 (FBFM_1, FBFM_2: query fa (.) ba, key/value cat(fa, ba))       -> :class:`FusionBlock`
* mean of F_1, F_2; eq. 8 (s = sigmoid(FC(F)), s_c = softmax(FC(maxpool_t F))) -> :meth:`BMFNHead.forward`
* supervised objective BCE(s) + CE(s_c); inference s_t >= 0.5 -> class of s_c, else background
    -> :meth:`BMFNHead.loss`, :meth:`BMFNHead.predict`
* weak: joint scores s_f = s x s_c [T, C], MIL pooling over time       -> :meth:`BMFNHead.loss`

Stated sizes: d = 256, d_m = 2560, k (p) = 5, 4 heads, expansion ratio r = 2, W_1 (d_v -> d), W_2 (d -> d_v),
W_3 (d_v -> 1), W_4 (d_v -> d), W_5 (d -> d_v), W_6 (d -> 1); Adam 5e-4 halved every 10 epochs, batch 32.
The paper "freezes" the rate after 30 epochs (the public code: milestones 10, 20, 30, 200 epochs); a step
schedule cannot freeze, so ``train_defaults`` stops at 30 epochs (lr 5e-4, 2.5e-4, 1.25e-4).

Choices where the paper is silent or its notation is compact (all in :class:`BMFNConfig`):

* ``visual_fc`` (true): like the public code, the visual map first goes through Linear(512, 512) + ReLU +
  dropout 0.2 per position ("used for adaption of different visual features"); both eq. 1 and eq. 2 read it.
* ``channel_residual`` (false): the paper multiplies by the channel weights (M^C (.) v, W^C (.) av^2); the
  public code multiplies by (weights + 1).
* eq. 1's W_3 is one linear layer d_v -> 1 as written (the public code uses 512 -> 256 -> 1 with a ReLU).
* Every transformer layer is post-LN with a FFN of 2048 (``ffn_dim``, [7] / the public code), dropout 0.1,
  attention scaled by sqrt(d / heads) and an output projection W_O. ``residual`` = "standard" is
  LN(x + Att); LN(h + FFN(h)) as in [7] and the public code; "paper" is eq. 4/5 literally:
  h = LN(X + Q~), LN(X + FFN(h)), with Q~ the projected query.
* ``esa_activation`` (sigmoid): eq. 4's delta is the sigmoid of the paper's notation; the public code (and
  Refiner [17]) use ReLU6.
* A self-attention block is ``esa_layers`` ESA layers then ``nsa_layers`` NSA layers (1 + 1, "composed of an
  ESA and a NSA"; the public code stacks 2 + 2), after a Linear(input, d) that makes the T x d inputs.
* FA/BA queries go through their own Linear(input, d); the key/value is cat(query, self-attended) over time.
* ``fbfm_ffn`` (true): FBFM is "also an encoder of transformer" (eq. 5, with FFN); the public code's FBFM is
  attention + LN only.
* s_c has C - 1 outputs (foreground classes, "C ... foreground categories"); the video's class for the CE is
  ``video_label`` (videos without an event are left out of that term).
* Inference uses s_t >= 0.5 as the paper writes (the public code: > 0.5; they differ only at exactly 0.5).
* ``HeadOutput.scores`` is built so that its argmax is the paper's inference rule: foreground column c is
  log s_t + log s_c[c] - max_c log s_c (the best class scores log s_t), background is log(1 - s_t).
* Weak: s_f = s_t * s_c, pooled over valid segments with ``weak_pool`` (max, deep MIL [18]), BCE against the
  one-hot foreground label. The trainer's ``weak_pool`` argument is ignored.

Ablations: Table 2 ``fbfm`` = both | first | second ("w/o FBFM_2" = first, "w/o FBFM_1" = second) and
``pairing`` = modality (BMFN) | direction (BMFN*: FBFM_1* fuses fa^1, fa^2, FBFM_2* fuses ba^1, ba^2);
Table 3 ``joint`` = mean | add | multiply | concat. Blocks that a variant does not use are not created.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from train.heads.base import Head, HeadOutput, grid_map
from train.heads.layers import (
    activation,
    gated_predict,
    gated_segment_scores,
    masked_mean,
    pool_over_time,
    mfb_pool,
    valid_mask,
)
from train.registry import register_head


@dataclasses.dataclass
class BMFNConfig:
    """Options of the BMFN head (defaults: the paper, or the choices in the module doc)."""

    audio_dim: int = 128
    visual_dim: int = 512
    #: d of eq. 1-8
    d: int = 256
    #: MFB rise dimension d_m and sum-pooling size k (d_m / k = d_v)
    mfb_dim: int = 2560
    mfb_pool: int = 5
    mfb_dropout: float = 0.1
    heads: int = 4
    expansion_ratio: int = 2
    esa_activation: str = "sigmoid"
    esa_layers: int = 1
    nsa_layers: int = 1
    ffn_dim: int = 2048
    dropout: float = 0.1
    residual: Literal["standard", "paper"] = "standard"
    fbfm_ffn: bool = True
    visual_fc: bool = True
    visual_fc_dropout: float = 0.2
    channel_residual: bool = False
    #: ablations (Tables 2 and 3)
    fbfm: Literal["both", "first", "second"] = "both"
    pairing: Literal["modality", "direction"] = "modality"
    joint: Literal["mean", "add", "multiply", "concat"] = "mean"
    #: weak MIL pooling of the joint scores over time
    weak_pool: Literal["max", "mean"] = "max"


class VisualAttention(nn.Module):
    """Eq. 1. forward(v [B,T,S,Dv]) -> (v^E [B,T,Dv], M^C [B,T,Dv], M^S [B,T,S])."""

    def __init__(self, dv: int, d: int, channel_residual: bool):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(dv, dv), nn.ReLU())  # Phi_v^c
        self.w1 = nn.Linear(dv, d)
        self.w2 = nn.Linear(d, dv)
        self.w3 = nn.Linear(dv, 1)
        self.channel_residual = channel_residual

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m_c = torch.sigmoid(self.w2(F.relu(self.w1(self.phi(v).mean(dim=-2)))))
        v_c = (m_c + 1 if self.channel_residual else m_c).unsqueeze(-2) * v
        m_s = torch.tanh(self.w3(v_c)).squeeze(-1).softmax(dim=-1)
        return torch.einsum("bts,btsd->btd", m_s, v_c), m_c, m_s


class AudioVisualFusionAttention(nn.Module):
    """AVFA, eq. 2-3. forward(v [B,T,S,Dv], a [B,T,Da]) -> (av_t [B,T,Dv], W^C [B,T,Dv], W^S [B,T,S])."""

    def __init__(self, cfg: BMFNConfig):
        super().__init__()
        if cfg.mfb_dim != cfg.mfb_pool * cfg.visual_dim:
            raise ValueError(f"bmfn: mfb_dim ({cfg.mfb_dim}) must be mfb_pool ({cfg.mfb_pool}) x visual_dim "
                             f"({cfg.visual_dim}) so that av_t has d_v channels")
        self.v1 = nn.Linear(cfg.visual_dim, cfg.mfb_dim)  # Phi_V1
        self.a1 = nn.Linear(cfg.audio_dim, cfg.mfb_dim)  # Phi_A1
        self.v2 = nn.Linear(cfg.visual_dim, cfg.mfb_dim)  # Phi_V2
        self.a2 = nn.Linear(cfg.audio_dim, cfg.mfb_dim)  # Phi_A2
        self.w4 = nn.Linear(cfg.visual_dim, cfg.d)
        self.w5 = nn.Linear(cfg.d, cfg.visual_dim)
        self.w6 = nn.Linear(cfg.d, 1)
        self.pool = cfg.mfb_pool
        self.drop = nn.Dropout(cfg.mfb_dropout)
        self.channel_residual = cfg.channel_residual

    def mfb(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Eq. 2 at every position s: [B,T,S,d_m] x [B,T,d_m] -> [B,T,S,d_m / k]."""
        return mfb_pool(self.drop(v * a.unsqueeze(-2)), self.pool)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        av1 = self.mfb(self.v1(v), self.a1(a))
        av2 = self.mfb(self.v2(v), self.a2(a))
        w_t = F.relu(self.w4(av1))  # W_t [B,T,S,d]
        w_c = torch.sigmoid(self.w5(w_t.mean(dim=-2)))  # W^C [B,T,Dv]
        av_c = (w_c + 1 if self.channel_residual else w_c).unsqueeze(-2) * av2
        w_s = torch.tanh(self.w6(w_t)).squeeze(-1).softmax(dim=-1)  # W^S [B,T,S]
        return torch.einsum("bts,btsd->btd", w_s, av_c), w_c, w_s


class AttentionExpansion(nn.Module):
    """Eq. 4's refinement of the attention maps: BN(W_8 delta(BN(W_7 Att))), W_7 / W_8 are 1x1
    convolutions over the head axis (n_h -> n_h r -> n_h, no bias). [B,n_h,Tq,Tk] -> same."""

    def __init__(self, heads: int, ratio: int, act: str):
        super().__init__()
        self.w7 = nn.Conv2d(heads, heads * ratio, 1, bias=False)
        self.bn7 = nn.BatchNorm2d(heads * ratio)
        self.act = activation(act)
        self.w8 = nn.Conv2d(heads * ratio, heads, 1, bias=False)
        self.bn8 = nn.BatchNorm2d(heads)

    def forward(self, att: torch.Tensor) -> torch.Tensor:
        return self.bn8(self.w8(self.act(self.bn7(self.w7(att)))))


class MultiHeadAttention(nn.Module):
    """Q~ = Q W_Q, K~ = K W_K, V~ = V W_V; Att = softmax(Q~ K~^T / sqrt(d / n_h)) per head; with an
    expansion (ESA) the maps become Att^ + Att. forward(query [B,Tq,d], memory [B,Tk,d]) ->
    (X [B,Tq,d] after W_O, Q~ [B,Tq,d], attention [B,n_h,Tq,Tk])."""

    def __init__(self, d: int, heads: int, dropout: float, expansion: AttentionExpansion | None = None):
        super().__init__()
        if d % heads:
            raise ValueError(f"bmfn: d = {d} is not divisible by {heads} heads")
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads
        self.expansion = expansion
        self.drop = nn.Dropout(dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B,n_h,T,d_h]

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_proj = self.q(query)
        q, k, v = self.split(q_proj), self.split(self.k(memory)), self.split(self.v(memory))
        att = self.drop((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1))
        if self.expansion is not None:
            att = self.expansion(att) + att
        out = (att @ v).transpose(1, 2).flatten(2)
        return self.o(out), q_proj, att


class EncoderLayer(nn.Module):
    """Transformer encoder layer of eq. 4 (with ``expansion``: ESA) or eq. 5 (NSA).
    forward(query [B,Tq,d], memory [B,Tk,d] or None for self-attention) -> [B,Tq,d]."""

    def __init__(self, cfg: BMFNConfig, expansion: bool = False, ffn: bool = True):
        super().__init__()
        exp = AttentionExpansion(cfg.heads, cfg.expansion_ratio, cfg.esa_activation) if expansion else None
        self.attn = MultiHeadAttention(cfg.d, cfg.heads, cfg.dropout, exp)
        self.norm1 = nn.LayerNorm(cfg.d)
        self.ffn = None
        if ffn:
            self.ffn = nn.Sequential(nn.Linear(cfg.d, cfg.ffn_dim), nn.ReLU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(cfg.ffn_dim, cfg.d))
            self.norm2 = nn.LayerNorm(cfg.d)
        self.drop = nn.Dropout(cfg.dropout)
        self.residual = cfg.residual

    def forward(self, query: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        x, q_proj, _ = self.attn(query, query if memory is None else memory)
        x = self.drop(x)
        h = self.norm1((q_proj if self.residual == "paper" else query) + x)
        if self.ffn is None:
            return h
        y = self.drop(self.ffn(h))
        return self.norm2((x if self.residual == "paper" else h) + y)


class SelfAttentionBlock(nn.Module):
    """Linear(input, d) then ESA layers then NSA layers: [B,T,input] -> [B,T,d] (v^self, a^self, av^self)."""

    def __init__(self, input_dim: int, cfg: BMFNConfig):
        super().__init__()
        self.proj = nn.Linear(input_dim, cfg.d)
        self.layers = nn.ModuleList([EncoderLayer(cfg, expansion=True) for _ in range(cfg.esa_layers)]
                                    + [EncoderLayer(cfg) for _ in range(cfg.nsa_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class CrossAttentionBlock(nn.Module):
    """Eq. 6: Encoder(q, cat(q, kv), cat(q, kv)) with q = Linear(input, d)(query).
    forward(query [B,T,input], kv [B,T,d]) -> [B,T,d]."""

    def __init__(self, input_dim: int, cfg: BMFNConfig):
        super().__init__()
        self.proj = nn.Linear(input_dim, cfg.d)
        self.encoder = EncoderLayer(cfg)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = self.proj(query)
        return self.encoder(q, torch.cat([q, kv], dim=1))


class FusionBlock(nn.Module):
    """FBFM, eq. 7: Encoder(x (.) y, cat(x, y), cat(x, y)). forward(x, y [B,T,d]) -> [B,T,d]."""

    def __init__(self, cfg: BMFNConfig):
        super().__init__()
        self.encoder = EncoderLayer(cfg, ffn=cfg.fbfm_ffn)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.encoder(x * y, torch.cat([x, y], dim=1))


#: which bi-directional cells each FBFM fuses, per pairing
PAIRS = {"modality": (("fa1", "ba1"), ("fa2", "ba2")), "direction": (("fa1", "fa2"), ("ba1", "ba2"))}
#: cell -> (query input, self-attended key/value)
CELLS = {"fa1": ("v_e", "av_self"), "fa2": ("a", "av_self"), "ba1": ("av", "v_self"), "ba2": ("av", "a_self")}


@register_head("bmfn")
class BMFNHead(Head):
    """BMFN (Liu et al. ICASSP 2022: 78.7%, weak 74.0%): AVFA + bi-directional attention + FBFMs.

    Visual attention + AVFA -> self-attention blocks -> forward/backward attention -> FBFMs -> mean ->
    event-relevance + category scores.

    forward(audio [B,T,128], visual [B,T,7,7,512]) -> HeadOutput(scores [B,T,C] (see module doc; argmax =
    the paper's inference), extras: ``relevance_logits`` [B,T] (s before its sigmoid), ``category_logits``
    [B,C-1] (s_c before its softmax), ``channel_attention`` M^C [B,T,512] and ``visual_spatial_attention`` M^S
    [B,T,49] (eq. 1, visual self-attention, when v^E is used); spatial = AVFA's audio-guided W^S (eq. 3) as
    [B,T,7,7]).
    """

    Config = BMFNConfig
    train_defaults = {"lr": 5e-4, "batch_size": 32, "epochs": 30, "lr_step": 10, "lr_gamma": 0.5,
                      "weight_decay": 0.0}

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        pairs = PAIRS[cfg.pairing]
        self.pairs = {"both": pairs, "first": pairs[:1], "second": pairs[1:]}[cfg.fbfm]
        cells = sorted({cell for pair in self.pairs for cell in pair})
        selfs = sorted({CELLS[c][1] for c in cells})
        self.needs_visual_attention = "fa1" in cells or "v_self" in selfs
        if cfg.visual_fc:
            self.visual_fc = nn.Sequential(nn.Linear(cfg.visual_dim, cfg.visual_dim), nn.ReLU(),
                                           nn.Dropout(cfg.visual_fc_dropout))
        if self.needs_visual_attention:
            self.visual_attention = VisualAttention(cfg.visual_dim, cfg.d, cfg.channel_residual)
        self.avfa = AudioVisualFusionAttention(cfg)
        dims = {"v_self": cfg.visual_dim, "a_self": cfg.audio_dim, "av_self": cfg.visual_dim,
                "v_e": cfg.visual_dim, "a": cfg.audio_dim, "av": cfg.visual_dim}
        self.self_attention = nn.ModuleDict({name: SelfAttentionBlock(dims[name], cfg) for name in selfs})
        self.cells = nn.ModuleDict({c: CrossAttentionBlock(dims[CELLS[c][0]], cfg) for c in cells})
        self.fbfms = nn.ModuleList([FusionBlock(cfg) for _ in self.pairs])
        width = 2 * cfg.d if cfg.joint == "concat" and len(self.pairs) == 2 else cfg.d
        self.relevance = nn.Linear(width, 1)
        self.category = nn.Linear(width, num_classes - 1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        v = visual.flatten(2, 3)
        if self.config.visual_fc:
            v = self.visual_fc(v)
        extras: dict[str, torch.Tensor] = {}
        feats = {"a": audio}
        feats["av"], _, fusion_spatial = self.avfa(v, audio)
        if self.needs_visual_attention:
            feats["v_e"], extras["channel_attention"], extras["visual_spatial_attention"] = self.visual_attention(v)
        sources = {"v_self": "v_e", "a_self": "a", "av_self": "av"}
        for name, block in self.self_attention.items():
            feats[name] = block(feats[sources[name]])
        cells = {c: block(feats[CELLS[c][0]], feats[CELLS[c][1]]) for c, block in self.cells.items()}
        fused = [fbfm(cells[x], cells[y]) for fbfm, (x, y) in zip(self.fbfms, self.pairs)]
        final = self.joint(fused)  # F [B,T,d]
        s = self.relevance(final).squeeze(-1)  # [B,T]
        s_c = self.category(final.max(dim=1).values)  # [B,C-1]
        extras["relevance_logits"], extras["category_logits"] = s, s_c
        return HeadOutput(scores=self.segment_scores(s, s_c), extras=extras, spatial=grid_map(fusion_spatial, visual))

    def joint(self, fused: list[torch.Tensor]) -> torch.Tensor:
        """Table 3: combine F_1 and F_2 (mean in the paper)."""
        if len(fused) == 1:
            return fused[0]
        how = self.config.joint
        if how == "mean":
            return (fused[0] + fused[1]) / 2
        if how == "add":
            return fused[0] + fused[1]
        if how == "multiply":
            return fused[0] * fused[1]
        return torch.cat(fused, dim=-1)

    @staticmethod
    def segment_scores(s: torch.Tensor, s_c: torch.Tensor) -> torch.Tensor:
        """s [B,T], s_c [B,C-1] -> [B,T,C] whose argmax is: background (last) if sigmoid(s_t) < 0.5, else
        argmax s_c (:func:`train.heads.layers.gated_segment_scores`)."""
        return gated_segment_scores(s, s_c, s_c.shape[-1] + 1)

    def predict(self, out: HeadOutput) -> torch.Tensor:
        """Eq. 8 inference: s_t >= 0.5 -> the category of s_c, otherwise background (C - 1)
        (:func:`train.heads.layers.gated_predict`, inclusive)."""
        s, s_c = out.extras["relevance_logits"], out.extras["category_logits"]
        return gated_predict(s, s_c, self.num_classes, inclusive=True)

    def weak_pooling(self, requested: str) -> str:
        """``train.weak_pool`` is ignored: heads.bmfn.weak_pool decides."""
        return self.config.weak_pool

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        """Supervised: BCE(s, segment is an event) + CE(s_c, the video's event class). Weak: BCE of the
        MIL-pooled joint scores s_f against the one-hot foreground video label. ``weak_pool`` is ignored."""
        s, s_c = out.extras["relevance_logits"], out.extras["category_logits"]
        valid = valid_mask(batch, s)
        background = self.num_classes - 1
        video_label = batch["video_label"].to(s.device)
        if self.setting == "weak":
            return weak_joint_loss(s, s_c, video_label, valid, self.config.weak_pool)
        is_event = (batch["labels"].to(s.device) != background).to(s.dtype)
        relevance = masked_mean(F.binary_cross_entropy_with_logits(s, is_event, reduction="none"), valid)
        has_event = video_label != background
        category = F.cross_entropy(s_c, video_label.clamp_max(background - 1), reduction="none")
        return relevance + (category * has_event).sum() / has_event.sum().clamp_min(1)


def weak_joint_loss(s: torch.Tensor, s_c: torch.Tensor, video_label: torch.Tensor, valid: torch.Tensor,
                    pool: str) -> torch.Tensor:
    """s_f = sigmoid(s) [B,T,1] x softmax(s_c) [B,1,C-1]; MIL pooling over valid segments; BCE against the
    one-hot foreground class (all zeros for a background-only video)."""
    joint = torch.sigmoid(s).unsqueeze(-1) * s_c.softmax(dim=-1).unsqueeze(1)
    if pool == "max":
        video = pool_over_time(joint, valid, "max")
    elif pool == "mean":
        video = pool_over_time(joint, valid, "mean")
    else:
        raise ValueError(f"heads.bmfn.weak_pool must be 'max' or 'mean', got {pool!r}")
    foreground = s_c.shape[-1]
    target = F.one_hot(video_label.clamp_max(foreground), foreground + 1)[:, :foreground].to(video.dtype)
    return F.binary_cross_entropy(video.clamp(1e-7, 1 - 1e-7), target)
