"""CMRAN head: Xu, Zeng, Wu, Tan, Gan, "Cross-Modal Relation-Aware Networks for Audio-Visual Event
Localization", ACM MM 2020; matched to the public reference code FloretCat/CMRAN (``model/main_model.py``:
``supv_main_model``, ``weak_main_model``; ``model/models.py``; ``supv_main.py``, ``weakly_main.py``;
``configs/default_config.yaml``, ``supv_train.sh``, ``weakly_train.sh``).

Forward (both settings; shapes at the defaults, d = 256; the layers are in :mod:`train.heads.relation`)::

    visual [B,T,7,7,512] -> v_fc Linear(512, 512), ReLU, Dropout(0.2)                   [B,T,7,7,512]
    AGSCA(audio [B,T,128], visual) -> v [B,T,512], spatial weights [B,T,49]
    video_encoder = InternalTemporalRelation(512 -> d; 4 heads, 2 layers, ffn 2048)(v)    [B,T,d]
    audio_decoder = CrossModalRelationAttention(128 -> d; 4 heads, 1 layer)(audio, video_encoder) [B,T,d]
    audio_encoder = InternalTemporalRelation(128 -> d)(audio)                            [B,T,d]
    video_decoder = CrossModalRelationAttention(512 -> d)(v, audio_encoder)              [B,T,d]
    fused = AVInter = AudioVisualInteraction(d; 4 heads supervised, 2 weak)(video_decoder, audio_decoder)
    is_event_scores = classifier Linear(d, 1)(fused)                                     [B,T] logits
    event_scores   = event_classifier(max over T of fused)   supervised Linear(d, C-1)   [B,C-1]
                                                             weak       Linear(d, C)     [B,C]

(The reference runs ``SupvLocalizeModule`` / ``WeaklyLocalizationModule``; our ``classifier`` and
``event_classifier`` are their layers. Its hard-coded 28 / 29 outputs are C - 1 / C here.)

Losses (``loss`` returns ``{"loss": total, ...terms}``)
--------------------------------------------------------
* supervised (``supv_main.py`` l. 149-158): ``BCEWithLogits(is_event_scores, segment is an event)``
  (mean over the valid segments) ``+ CrossEntropy(event_scores, video event class)`` (mean over videos);
  terms ``is_event``, ``event``. The reference's class target is ``labels[:, :, :-1].max(-1)`` ->
  per-segment argmax over the 28 foreground columns (0 for a background segment), then the max over
  time; we compute the same from ``labels`` (max over the valid segments of the foreground class, a
  background segment counting as 0). For a video with one event class that is its class; a video
  without any event segment gets target 0 as in the reference (AVE's supervised split has none).
* weak (``weakly_main.py`` l. 144-154, ``WeaklyLocalizationModule``): fused logits
  ``sigmoid(is_event_scores)[B,T,1] * event_scores[B,1,C]``, max over (valid) time, softmax, then
  ``MultiLabelSoftMarginLoss`` of these PROBABILITIES against the one-hot video label over C classes
  (``mil_labels.h5``; background-only videos (``labels_noisy.h5``) are one-hot at C - 1). The pooling
  is the reference's max whatever ``train.weak_pool`` asks (:meth:`CMRANHead.weak_pooling`).

Prediction (``compute_accuracy_supervised`` of both scripts; the weak script calls it with
``raw_logits``): ``sigmoid(is_event_scores) > 0.5`` -> ``argmax event_scores`` (weak: over all C, so it
may be background), else background C - 1. ``HeadOutput.scores`` [B,T,C] is built so that its argmax is
this rule (up to ties at exactly 0.5): foreground column c = ``log s_t + log p_c - max_c' log p_c'``
(p = softmax(event_scores)), background = ``log(1 - s_t)`` (weak: the larger of that and the
background column built like a foreground one).

Extras: ``attention`` [B,T,7,7] AGSCA spatial weights; ``is_event_scores`` [B,T] logits;
``event_scores`` [B,C-1] (supervised) / [B,C] (weak: the reference's ``raw_logits``) logits.

Schedule
--------
Adam (no weight decay: ``configs/default_config.yaml`` l. 9 sets 5e-4 but ``torch.optim.Adam(params,
lr=args.lr)`` (supv_main.py l. 84, weakly_main.py l. 82) never passes it), batch 32
(default_config.yaml l. 3), MultiStepLR stepped per epoch, gamma 0.5:

* supervised: lr 5e-4 (supv_train.sh l. 3), 200 epochs (l. 6), grad_clip 0.1 (l. 4),
  milestones 10, 20, 30 (supv_main.py l. 86);
* weak: lr 5e-4 (weakly_train.sh l. 3), 200 epochs (l. 5), grad_clip 0.5 (default_config.yaml l. 7;
  the script does not override it), milestones 5, 20, 40 (weakly_main.py l. 85).

The reference keeps the best test-accuracy epoch and trains the model in float64 (``model.double()``).

Reported AVE accuracy: 77.4 % supervised, 72.9 % weak (the paper; as cited in the BMFN and AVLTC tables). The
repository's test scripts name their checkpoints 76.095 % (``supv_test.sh``, epoch 12) and 72.363 %
(``weakly_test.sh``, epoch 39).

Parameters at the defaults, C = 29 (tests/test_cmran_parity.py): supervised 9,509,150 used (= ours) of
the reference ``supv_main_model``'s 15,863,262 registered; weak 9,509,407 used of ``weak_main_model``'s
15,863,519 registered.
The reference registers and never runs: the template ``encoder_layer`` / ``decoder_layer`` that its
``Encoder`` / ``Decoder`` deep-copy (2 x 1,315,072 + 2 x 1,578,240), the ``self_attn`` of every
``DecoderLayer`` (2 x 263,168) and AGSCA's ``affine_video_guided_1/2`` (41,152).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from train.heads.base import Head, HeadOutput
from train.heads.layers import gated_predict, gated_segment_scores, masked_mean, pool_over_time, valid_mask
from train.heads.relation import (
    AudioGuidedSpatialChannelAttention,
    AudioVisualInteraction,
    CrossModalRelationAttention,
    InternalTemporalRelation,
)
from train.registry import register_head

AUDIO_DIM = 128
VISUAL_DIM = 512

#: supv_main.py + supv_train.sh + configs/default_config.yaml (see the module docstring)
SUPERVISED_SCHEDULE: dict[str, Any] = {
    "lr": 5e-4, "batch_size": 32, "epochs": 200, "lr_step": None, "milestones": (10, 20, 30),
    "lr_gamma": 0.5, "weight_decay": 0.0, "grad_clip": 0.1,
}
#: weakly_main.py + weakly_train.sh + configs/default_config.yaml
WEAK_SCHEDULE: dict[str, Any] = {
    "lr": 5e-4, "batch_size": 32, "epochs": 200, "lr_step": None, "milestones": (5, 20, 40),
    "lr_gamma": 0.5, "weight_decay": 0.0, "grad_clip": 0.5,
}


@dataclasses.dataclass
class CMRANConfig:
    """Options of the CMRAN head (defaults: the reference ``supv_main_model`` / ``weak_main_model``)."""

    #: output width of ``v_fc`` (main_model.py ``video_fc_dim`` 512); AGSCA works at this width
    visual_fc_dim: int = 512
    #: dropout after ``v_fc`` + ReLU (main_model.py ``nn.Dropout(0.2)``)
    visual_dropout: float = 0.2
    #: AGSCA channel-attention width (models.py ``affine_video_1`` / ``affine_audio_1``: 512)
    att_dim: int = 512
    #: AGSCA bottleneck and spatial-attention width (models.py ``affine_bottleneck``, ``affine_video_2``: 256)
    att_hidden: int = 256
    #: d_model of the relation modules (main_model.py 256)
    d: int = 256
    #: heads of the encoder / decoder layers (main_model.py ``nhead=4``)
    heads: int = 4
    #: feed-forward width of the encoder / decoder layers (models.py ``dim_feedforward=2048``)
    ffn_dim: int = 2048
    #: encoder layers of each internal temporal relation module (main_model.py ``num_layers=2``)
    encoder_layers: int = 2
    #: CMRA decoder layers of each cross-modal relation attention module (main_model.py ``num_layers=1``)
    decoder_layers: int = 1
    #: dropout of the encoder / decoder layers (attention and residual; models.py 0.1)
    dropout: float = 0.1
    #: heads of the audio-visual interaction, supervised setting (``AudioVideoInter(..., n_head=4)``)
    inter_heads: int = 4
    #: heads of the audio-visual interaction, weak setting (``AudioVideoInter(..., n_head=2)``)
    weak_inter_heads: int = 2
    #: attention and residual dropout of the audio-visual interaction (``head_dropout=0.1``, ``Dropout(0.1)``)
    inter_dropout: float = 0.1


@register_head("cmran")
class CMRANHead(Head):
    """CMRAN (Xu et al., ACM MM 2020; FloretCat/CMRAN): audio-guided spatial-channel attention + relation-aware modules.

    forward(audio [B,T,128], visual [B,T,7,7,512]) -> scores [B,T,C] (argmax = the reference's
    prediction rule), spatial [B,T,7,7] (the audio-guided spatial attention), extras ``is_event_scores`` [B,T],
    ``event_scores`` [B,C-1] supervised / [B,C] weak. Supervised loss BCE(is-event) + CE(event class);
    weak loss MultiLabelSoftMargin of softmax(max_t sigmoid(is_event) x event_scores).

    Parameters at the defaults, C = 29: supervised 9,509,150 (reference supv_main_model registers
    15,863,262), weak 9,509,407 (reference weak_main_model registers 15,863,519)."""

    Config: ClassVar[type] = CMRANConfig
    settings: ClassVar[tuple[str, ...]] = ("supervised", "weak")
    train_defaults: ClassVar[dict[str, Any]] = SUPERVISED_SCHEDULE
    weak_train_defaults: ClassVar[dict[str, Any]] = WEAK_SCHEDULE

    def __init__(self, num_classes: int, setting: str = "supervised", config: CMRANConfig | None = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        width = cfg.visual_fc_dim
        self.v_fc = nn.Linear(VISUAL_DIM, width)
        self.visual_dropout = nn.Dropout(cfg.visual_dropout)
        self.spatial_channel_att = AudioGuidedSpatialChannelAttention(AUDIO_DIM, width, cfg.att_dim, cfg.att_hidden)
        relation = {"heads": cfg.heads, "ffn_dim": cfg.ffn_dim, "dropout": cfg.dropout}
        self.video_encoder = InternalTemporalRelation(width, cfg.d, layers=cfg.encoder_layers, **relation)
        self.video_decoder = CrossModalRelationAttention(width, cfg.d, layers=cfg.decoder_layers, **relation)
        self.audio_encoder = InternalTemporalRelation(AUDIO_DIM, cfg.d, layers=cfg.encoder_layers, **relation)
        self.audio_decoder = CrossModalRelationAttention(AUDIO_DIM, cfg.d, layers=cfg.decoder_layers, **relation)
        inter_heads = cfg.weak_inter_heads if setting == "weak" else cfg.inter_heads
        self.AVInter = AudioVisualInteraction(cfg.d, inter_heads, attn_dropout=cfg.inter_dropout,
                                              dropout=cfg.inter_dropout)
        self.classifier = nn.Linear(cfg.d, 1)
        # supervised: the 28 foreground classes; weak: all 29 (background included)
        self.event_classifier = nn.Linear(cfg.d, num_classes - 1 if setting == "supervised" else num_classes)

    def check_inputs(self, audio: torch.Tensor, visual: torch.Tensor) -> None:
        if audio.dim() != 3 or audio.shape[-1] != AUDIO_DIM:
            raise ValueError(f"head {self.name!r}: audio must be [B, T, {AUDIO_DIM}], got {list(audio.shape)}")
        if visual.dim() != 5 or visual.shape[-1] != VISUAL_DIM or visual.shape[:2] != audio.shape[:2]:
            raise ValueError(f"head {self.name!r}: visual must be [B, T, H, W, {VISUAL_DIM}] with the audio's "
                             f"B, T = {list(audio.shape[:2])}, got {list(visual.shape)}")

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        self.check_inputs(audio, visual)
        grid = visual.shape[2:4]
        v = self.visual_dropout(F.relu(self.v_fc(visual)))
        v, spatial = self.spatial_channel_att(audio, v)  # [B,T,Dv], [B,T,R]
        audio_query = self.audio_decoder(audio, self.video_encoder(v))
        video_query = self.video_decoder(v, self.audio_encoder(audio))
        fused = self.AVInter(video_query, audio_query)  # [B,T,d]
        is_event = self.classifier(fused).squeeze(-1)  # [B,T]
        event = self.event_classifier(fused.max(dim=1).values)  # [B,C-1] / [B,C]
        extras = {"is_event_scores": is_event, "event_scores": event}
        return HeadOutput(self.segment_scores(is_event, event), extras, spatial=spatial.reshape(*spatial.shape[:2], *grid))

    def segment_scores(self, is_event: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        """is_event [B,T], event [B,C-1] / [B,C] -> [B,T,C] whose argmax is :meth:`predict`'s rule (see the
        module docstring; :func:`train.heads.layers.gated_segment_scores`)."""
        return gated_segment_scores(is_event, event, self.num_classes)

    def predict(self, out: HeadOutput) -> torch.Tensor:
        """``compute_accuracy_supervised``: sigmoid(is_event) > 0.5 -> argmax event_scores, else C - 1
        (:func:`train.heads.layers.gated_predict`, not inclusive)."""
        is_event, event = out.extras["is_event_scores"], out.extras["event_scores"]
        return gated_predict(is_event, event, self.num_classes, inclusive=False)

    def weak_pooling(self, requested: str) -> str:
        """The reference max-pools the fused logits over time; ``train.weak_pool`` is ignored."""
        return "max"

    def video_probabilities(self, out: HeadOutput, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Weak: the reference's ``event_scores``, softmax over C of max over (valid) time of
        ``sigmoid(is_event) * event_scores``: [B, C]."""
        is_event, event = out.extras["is_event_scores"], out.extras["event_scores"]
        fused = torch.sigmoid(is_event).unsqueeze(-1) * event.unsqueeze(1)  # [B,T,C]
        return pool_over_time(fused, valid, "max").softmax(dim=-1)

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> dict[str, torch.Tensor]:
        is_event, event = out.extras["is_event_scores"], out.extras["event_scores"]
        valid = valid_mask(batch, is_event)
        has_valid = valid.any(dim=1)
        background = self.num_classes - 1
        if self.setting == "weak":
            probs = self.video_probabilities(out, valid)
            target = F.one_hot(batch["video_label"].to(probs.device), self.num_classes).to(probs.dtype)
            per_video = F.multilabel_soft_margin_loss(probs, target, reduction="none")
            return {"loss": masked_mean(per_video, has_valid)}
        labels = batch["labels"].to(is_event.device)
        foreground = (labels != background) & valid
        bce = F.binary_cross_entropy_with_logits(is_event, foreground.to(is_event.dtype), reduction="none")
        is_event_loss = masked_mean(bce, valid)
        target = torch.where(foreground, labels, torch.zeros_like(labels)).max(dim=1).values
        event_loss = masked_mean(F.cross_entropy(event, target, reduction="none"), has_valid)
        return {"loss": is_event_loss + event_loss, "is_event": is_event_loss, "event": event_loss}
