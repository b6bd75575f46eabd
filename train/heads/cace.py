"""CACE-Net (He et al., ACM MM 2024, "CACE-Net: Co-guidance Attention and Contrastive Enhancement
for Effective Audio-Visual Event Localization"), matched to the public reference code
Brain-Cog-Lab/CACE-Net, folder ``CACE/`` (``model/main_model.py``: ``supv_main_model``;
``model/models.py``: ``Co_Guided_Attention``; ``configs/main.json``; ``supv_main.py``;
``run_supp.sh`` / README: the command behind the paper's result).

CACE-Net is CMBS's supervised model (:mod:`train.heads.cmbs`, whose shared parts it reuses:
:class:`~train.heads.cmbs.SupervisedRelationHead`) with three changes: the attention also guides the
AUDIO by the visual (co-guidance), the decoders' feed-forward width is 512, and a contrastive
enhancement of the fused features switches on after an eighth of the epochs.

Inputs and outputs (T = segments, any T >= 2; C = classes incl. background, AVE: 29)::

    audio  [B, T, 128]          VGGish per segment
    visual [B, T, H, W, 512]    VGG-19 pool5 per segment (AVE: 7 x 7)
    -> HeadOutput.scores [B, T, C] (argmax = the reference's prediction rule)
       spatial [B, T, H, W]                     audio-guided spatial attention w_s
       extras["global_attention"] [B, T, H, W]  the beta branch's global spatial weights
       extras["is_event_scores"] [B, T] logits, ["event_scores"] [B, C-1] logits (incl. gamma * CAS),
       ["gate"] [B, T] (audio_gate * video_gate), ["cas_scores"] [B, C-1],
       ["contrastive_query"], ["contrastive_key"] [B, T, d] (L2-normalised; with ``contrastive``)

Layers (reference name -> ours)
-------------------------------
* ``v_fc`` Linear(512, 512) + ReLU + Dropout 0.2 (the registered ``a_fc`` is never run: not built).
* ``spatial_channel_att`` = ``Co_Guided_Attention(psai, beta, 512, 128)`` -> :class:`CoGuidedAttention`:
  the visual half is CMBS's cross-modal gated attention
  (:class:`~train.heads.cmbs.CrossModalGatedAttention`; CACE's LayerNorm ``v_norm`` = ours ``norm``);
  the audio half (visual-guided audio attention): a second region self-attention
  ``S2 = v_norm(V + dropout(softmax(q2(V) k2(V)^T) v2(V)))`` (``video_query2`` / ``video_key2`` /
  ``video_value2``; the reference normalises it with the SAME ``v_norm``, its ``v_norm2`` is never run),
  an audio self-attention over time ``A~ = a_norm(a + dropout(softmax(audio_query(a) audio_key(a)^T)
  audio_value(a)))`` (128 -> 128 each), then ``g = softmax(v_query(mean_r S2) vaudio_key(A~)^T)
  vaudio_value(A~)`` [B, T, 128] (attention over time, no scaling) and
  ``a <- a + psai * sigmoid(g) * a``. psai = 0 is the paper's Audio-Guide ablation (``--guide
  Audio-Guide`` builds ``Co_Guided_Attention(0.0, ...)``); the audio half is then not built.
  Not built either: ``ave_bottleneck``, ``v_norm2``.
* The BiLSTMs, relation encoders / decoders (4 heads; encoder ffn 1024, decoder ffn 512), gates, CAS
  branch, AVInter / VAInter (4 heads) and ``localize_module`` of CMBS's supervised model, fed with the
  co-guided audio and visual.
* ``localize_module`` (``SupvLocalizeModule(d, contrastive, Lambda)``) adds ``encoder_q``
  = Sequential(Linear(d, d), ReLU): ``q = encoder_q(fused)``; the is-event logit is
  ``classifier(fused + Lambda * q)`` once the contrastive switch is on (``classifier(fused)`` before);
  ``k = encoder_q(fused + 0.1 * N(0, 1))`` in training mode (drawn in the reference's time-first order,
  so a seed gives the same noise); q and k are L2-normalised over the features. The reference draws the
  noise in EVERY forward, but at evaluation k feeds nothing (its ``validate_epoch`` loss has no
  contrastive term); here evaluation uses ``k = encoder_q(fused)`` without noise, so that an evaluation
  is not random and does not shift the random stream of the following training epochs (the loop's
  validation loss then holds the contrastive term of the clean view). Without ``contrastive`` the
  reference still computes q and k but uses neither: ``encoder_q`` is not built.
* Not built either (registered by the reference, never run): every ``DecoderLayer.self_attn``, the
  deep-copied ``encoder_layer`` / ``decoder_layer`` templates.

Loss (``supv_main.py`` lines 198-245), returned as ``{"loss", "is_event", "gate", "event", "cas",
"contrastive"}``: CMBS's four supervised terms (:meth:`~train.heads.cmbs.SupervisedRelationHead.supervised_loss`)
plus, while the switch is on, ``contrastive_weight`` times the supervised contrastive loss over the
2T features ``[q; k]`` of each video (:func:`contrastive_loss`: temperature 0.01; positives of a
segment = its own other view and, for an event segment, every other event view of the video; the
mean over positives of exp inside the log). The reference computes it as
``log(sum exp(logits) * pos)`` in float64 (exp(100) overflows float32); ours is the same value through
``logsumexp``. The ``contrastive`` term is logged every epoch, added from the switch on.

Contrastive switch (``supv_main.py`` line 182): on from the 0-based epoch ``n_epoch / 8`` (epoch 26 of
200, 1-based), never off again; :meth:`CACEHead.start_epoch` follows that. A head built outside the
loop starts with the switch ON, as the reference's ``--evaluate`` sets it (``supv_main.py`` line 120):
the trained model's forward.

Prediction: CMBS's (``compute_accuracy_supervised``): sigmoid(is-event) > 0.5 -> argmax event_scores,
else background.

Schedule (README / ``run_supp.sh`` line 21: ``--lr 0.0007 --clip_gradient 0.5 --n_epoch 200 --b 64
--seed 3917 --guide Co-Guide --psai 0.3 --contrastive --Lambda 0.6 --contras_coeff 1.0``;
``supv_main.py``: Adam without weight decay, ``MultiStepLR([10, 20, 30], 0.5)`` stepped per epoch):
lr 7e-4, batch 64, 200 epochs, milestones (10, 20, 30), gamma 0.5, clip_grad_norm 0.5. The reference
trains in float64 (``model.double()``); the loop trains in float32. ``configs/main.json``: d_model 256,
alpha 0.1, gamma 0.3, beta 0.4.

Weak setting: not offered. The public ``weak_main_model`` does not build: its ``__init__`` reads
``self.dual`` (``main_model.py`` line 320), which nothing sets (AttributeError); with ``dual`` False
it would call ``New_Audio_Guided_Attention``, which ``CACE/model`` neither defines nor imports
(NameError); and ``CACE/`` has no weakly-supervised training script (no loss, schedule or evaluation
to follow; ``run_*.sh`` only run ``supv_main.py``). (Forcing ``dual = True`` builds a 12,270,841-parameter
model that runs forward, but without a training recipe.)

Reported AVE accuracy (README): 80.796 % supervised (checkpoint of epoch 46, seed 3917).

Parameter counts at the defaults with C = 29 (tests/test_cace_parity.py): the reference
``supv_main_model`` registers 13,118,681; 9,283,417 receive a gradient (= ours; before the switch
is on, ``encoder_q``'s 65,792 do not). psai = 0 builds 542,464 fewer; ``contrastive`` off 65,792 fewer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import register_head
from .base import HeadOutput
from .cmbs import (ATTENTION_DROPOUT, AUDIO_DIM, VISUAL_DIM, CrossModalGatedAttention, LocalizeModule,
                   RelationModelOptions, SupervisedRelationHead, check_inputs, map_extras)
from .layers import valid_mask

#: the paper's run (README, run_supp.sh) with supv_main.py's optimiser and scheduler
SCHEDULE = {"lr": 7e-4, "batch_size": 64, "epochs": 200, "lr_step": None, "milestones": (10, 20, 30),
            "lr_gamma": 0.5, "weight_decay": 0.0, "grad_clip": 0.5}
#: share of the epochs before the contrastive switch turns on (``epoch >= args.n_epoch / 8``)
CONTRASTIVE_START = 1 / 8
#: temperature of the contrastive logits (``logits /= 0.01``)
TEMPERATURE = 0.01
#: standard deviation of the feature noise of the key view (``data_augmentation``)
NOISE_STD = 0.1


@dataclasses.dataclass
class CACEConfig(RelationModelOptions):
    """Options of :class:`CACEHead` (defaults = ``configs/main.json`` + the README / run_supp.sh run)."""

    #: strength of the time-level gates (main.json alpha)
    alpha: float = 0.1
    #: weight of the CAS branch in the event logits (main.json gamma)
    gamma: float = 0.3
    #: weight of the global branch of the visual attention (main.json beta); 0 leaves it out
    beta: float = 0.4
    #: weight of the visual guidance of the audio (``--psai``); 0 = Audio-Guide (branch not built)
    psai: float = 0.3
    #: dropout after ``v_fc`` + ReLU
    visual_dropout: float = 0.2
    #: feed-forward width of the internal temporal relation encoders
    ffn_dim: int = 1024
    #: feed-forward width of the cross-modal relation decoders
    decoder_ffn_dim: int = 512
    #: heads of AVInter / VAInter
    inter_heads: int = 4
    #: contrastive enhancement (``--contrastive``): encoder_q, the Lambda term and the contrastive loss
    contrastive: bool = True
    #: weight of encoder_q(fused) added before the is-event classifier once the switch is on (``--Lambda``)
    enhance_weight: float = 0.6
    #: weight of the contrastive loss (``--contras_coeff``)
    contrastive_weight: float = 1.0


class CoGuidedAttention(CrossModalGatedAttention):
    """CACE-Net ``Co_Guided_Attention(psai, beta, 512, 128)``: the visual half is
    :class:`~train.heads.cmbs.CrossModalGatedAttention`; the audio half is the visual-guided audio
    attention (module docstring), built when psai != 0.

    forward(audio [B, T, Da], visual [B, T, H, W, Dv]) -> (attended visual [B, T, Dv], guided audio
    [B, T, Da], spatial weights [B, T, R], global weights [B, T, R] or None)."""

    def __init__(self, psai: float, beta: float, channel_dim: int = 512, hidden: int = 256, key_dim: int = 128,
                 audio_dim: int = AUDIO_DIM, visual_dim: int = VISUAL_DIM, dropout: float = ATTENTION_DROPOUT):
        super().__init__(beta, channel_dim, hidden, key_dim, audio_dim, visual_dim, dropout)
        self.psai = psai
        if psai != 0:
            self.video_query2 = nn.Linear(visual_dim, key_dim)
            self.video_key2 = nn.Linear(visual_dim, key_dim)
            self.video_value2 = nn.Linear(visual_dim, visual_dim)
            self.v_query = nn.Linear(visual_dim, audio_dim)
            self.vaudio_key = nn.Linear(audio_dim, audio_dim)
            self.vaudio_value = nn.Linear(audio_dim, audio_dim)
            self.audio_query = nn.Linear(audio_dim, audio_dim)
            self.audio_key = nn.Linear(audio_dim, audio_dim)
            self.audio_value = nn.Linear(audio_dim, audio_dim)
            self.a_norm = nn.LayerNorm(audio_dim)

    def guide_audio(self, audio: torch.Tensor, selfatt2: torch.Tensor) -> torch.Tensor:
        """``a + psai * sigmoid(g) * a`` with g the visual-guided audio attention: audio [B, T, Da],
        second self-attended map S2 [B, T, R, Dv] -> [B, T, Da]."""
        energy = self.audio_query(audio) @ self.audio_key(audio).transpose(-1, -2)  # [B, T, T]
        context = self.a_norm(audio + self.dropout(energy.softmax(dim=-1) @ self.audio_value(audio)))
        energy = self.v_query(selfatt2.mean(dim=-2)) @ self.vaudio_key(context).transpose(-1, -2)  # [B, T, T]
        guide = energy.softmax(dim=-1) @ self.vaudio_value(context)
        return audio + self.psai * torch.sigmoid(guide) * audio

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):  # type: ignore[override]
        regions = self.regions(visual)
        selfatt = self.self_attend(regions, self.video_query, self.video_key, self.video_value)
        selfatt2 = None
        if self.psai != 0:  # same order of dropout draws as the reference: S, S2, then the audio branch
            selfatt2 = self.self_attend(regions, self.video_query2, self.video_key2, self.video_value2)
        attended, spatial = self.attend(audio, regions, channel_query=selfatt)
        attended, glob = self.gate(attended, selfatt)
        guided = audio if selfatt2 is None else self.guide_audio(audio, selfatt2)
        return attended, guided, spatial, glob


class ContrastiveLocalizeModule(LocalizeModule):
    """CACE-Net ``SupvLocalizeModule(d, contrastive=True, Lambda)``: CMBS's classifiers plus
    ``encoder_q`` = Sequential(Linear(d, d), ReLU)."""

    def __init__(self, d: int, events: int):
        super().__init__(d, events)
        self.encoder_q = nn.Sequential(nn.Linear(d, d), nn.ReLU())


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, is_event: torch.Tensor, valid: torch.Tensor,
                     temperature: float = TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss of ``supv_main.py`` (lines 209-239) over the 2T views of each video.

    query, key [B, T, D] (L2-normalised views of the same segments), is_event [B, T] bool, valid [B, T]
    bool. With f = [query; key] [B, 2T, D] and l_ij = f_i . f_j / temperature, for every valid view i:
    ``-( logsumexp_{j in P(i)} l_ij - logsumexp_{j != i} l_ij - log |P(i)| )``, P(i) = the other view of
    the same segment, plus every other event view when i is an event segment; invalid views are
    neither anchors nor candidates. Mean over the valid views (reference: over all B * 2T)."""
    views = query.shape[1]
    feats = torch.cat([query, key], dim=1)
    logits = feats @ feats.transpose(1, 2) / temperature  # [B, 2T, 2T]
    event = torch.cat([is_event, is_event], dim=1)
    ok = torch.cat([valid, valid], dim=1)
    eye = torch.eye(2 * views, dtype=torch.bool, device=logits.device)
    other_view = eye.roll(views, dims=1)  # (i, i + T) and (i + T, i)
    candidates = ~eye & ok.unsqueeze(1)
    positives = ((event.unsqueeze(2) & event.unsqueeze(1)) | other_view) & candidates
    # an invalid anchor gets itself as its only candidate and positive: a finite 0 (kept out of the mean)
    own = eye & ~ok.unsqueeze(2)
    candidates, positives = candidates | own, positives | own
    log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=-1)
    log_all = torch.logsumexp(logits.masked_fill(~candidates, float("-inf")), dim=-1)
    per_view = -(log_pos - log_all - positives.sum(-1).clamp_min(1).to(logits.dtype).log())
    return (per_view * ok).sum() / ok.sum().clamp_min(1)


@register_head("cace")
class CACEHead(SupervisedRelationHead):
    """CACE-Net (He et al., ACM MM 2024; Brain-Cog-Lab/CACE-Net): co-guided attention + contrastive enhancement.

    CMBS's supervised model with co-guided (audio <-> visual) attention and contrastive
    enhancement of the fused features.
    Reported on AVE: 80.8 supervised (README: 80.796). Supervised only (the public weak model does
    not build; module docstring).

    forward(audio [B, T, 128], visual [B, T, H, W, 512]) -> HeadOutput(scores [B, T, C], extras; see the
    module docstring). Parameters at the defaults, C = 29: 9,283,417 (the reference registers
    13,118,681). :meth:`start_epoch` turns the contrastive switch on from epoch 1 + epochs / 8."""

    settings: ClassVar[tuple[str, ...]] = ("supervised",)
    Config = CACEConfig
    train_defaults = SCHEDULE

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        self.v_fc = nn.Linear(VISUAL_DIM, VISUAL_DIM)
        self.dropout = nn.Dropout(cfg.visual_dropout)
        self.spatial_channel_att = CoGuidedAttention(cfg.psai, cfg.beta, cfg.att_dim, cfg.att_hidden, cfg.key_dim)
        self.build_supervised(cfg)
        module = ContrastiveLocalizeModule if cfg.contrastive else LocalizeModule
        self.localize_module = module(cfg.d, num_classes - 1)
        #: the reference's ``contrastive_switch`` (see the module docstring for the initial state)
        self.contrastive_on = True

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """``if epoch >= n_epoch / 8: contrastive_switch = True`` with the reference's 0-based epoch."""
        self.contrastive_on = (epoch - 1) >= epochs * CONTRASTIVE_START

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        check_inputs(self.name, audio, visual)
        cfg = self.config
        v = self.dropout(F.relu(self.v_fc(visual)))
        attended, guided_audio, spatial, glob = self.spatial_channel_att(audio, v)
        extras = {} if glob is None else {"global_attention": map_extras(glob, visual)}
        fused, gate, av_score = self.supervised_trunk(guided_audio, attended, cfg.top_k)
        loc = self.localize_module
        if cfg.contrastive:
            query = loc.encoder_q(fused)
            content = fused + cfg.enhance_weight * query if self.contrastive_on else fused
            if self.training:  # the reference's randn_like on its time-first [T, B, d]
                noise = torch.randn(fused.shape[1], fused.shape[0], fused.shape[2], dtype=fused.dtype,
                                    device=fused.device).transpose(0, 1)
                key = loc.encoder_q(fused + NOISE_STD * noise)
            else:
                key = query
            extras["contrastive_query"] = F.normalize(query, dim=-1)
            extras["contrastive_key"] = F.normalize(key, dim=-1)
        else:
            content = fused
        is_event = loc.classifier(content).squeeze(-1)
        event = loc.event_classifier(fused.max(dim=1).values) + cfg.gamma * av_score
        out = self.supervised_output(is_event, event, gate, av_score, extras)
        out.spatial = map_extras(spatial, visual)
        return out

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean"):
        """CMBS's supervised terms + ``contrastive_weight`` x :func:`contrastive_loss` while the switch
        is on (the term is reported in every epoch)."""
        terms = self.supervised_loss(out, batch)
        if not self.config.contrastive:
            return terms
        query = out.extras["contrastive_query"]
        valid = valid_mask(batch, query)
        is_event = (batch["labels"].to(query.device) != self.num_classes - 1) & valid
        terms["contrastive"] = contrastive_loss(query, out.extras["contrastive_key"], is_event, valid)
        if self.contrastive_on:
            terms["loss"] = terms["loss"] + self.config.contrastive_weight * terms["contrastive"]
        return terms

    def predict(self, out: HeadOutput) -> torch.Tensor:
        """sigmoid(is-event) > 0.5 -> argmax event_scores, else background (C - 1): :meth:`supervised_predict`
        (:func:`train.heads.layers.gated_predict`, not inclusive)."""
        return self.supervised_predict(out)
