"""CMBS (Xia and Zhao, CVPR 2022, "Cross-Modal Background Suppression for Audio-Visual Event
Localization"), matched to the public reference code marmot-xy/CMBS (``model/main_model.py``:
``supv_main_model``, ``weak_main_model``; ``model/models.py``: ``New_Audio_Guided_Attention``;
``configs/main.json``, ``configs/weak.json``; ``supv_main.py``, ``weakly_main.py``,
``supv_train.sh``, ``weakly_train.sh``).

Inputs and outputs (T = segments, any T >= 2; C = classes incl. background, AVE: 29; background
is the last class C - 1, as index 28 of the reference's one-hot labels)::

    audio  [B, T, 128]          VGGish per segment
    visual [B, T, H, W, 512]    VGG-19 pool5 per segment (AVE: 7 x 7)
    -> HeadOutput.scores [B, T, C] (argmax = the reference's prediction, see :meth:`CMBSHead.predict`)
       spatial [B, T, H, W]                     audio-guided spatial attention (AGSCA's w_s)
       extras["global_attention"] [B, T, H, W]  the visual self-guided spatial weights of the beta branch
       supervised: extras["is_event_scores"] [B, T] (logits), ["event_scores"] [B, C-1] (logits incl.
                   gamma * CAS), ["gate"] [B, T] (audio_gate * video_gate, probabilities),
                   ["cas_scores"] [B, C-1] (av_score)
       weak:       extras["event_gate"] [B, T] ((audio_gate + video_gate) / 2, probabilities),
                   ["event_scores"] [B, C] (raw_logits: top-k mean of the gated CAS)

Layers (reference name -> ours; layer names kept so the parity test's key map only renames stacks)
---------------------------------------------------------------------------------------------------
* ``v_fc`` Linear(512, 512) + ReLU + Dropout (0.2 supervised, 0.1 weak) on every region vector.
* ``spatial_channel_att`` = ``New_Audio_Guided_Attention(beta)`` -> :class:`CrossModalGatedAttention`
  (the paper's cross-modal gated attention): the AGSCA of CMRAN
  (:class:`train.heads.relation.AudioGuidedSpatialChannelAttention`, channel width 512, hidden 256)
  whose CHANNEL query is not the map itself but its region self-attention
  ``S = LayerNorm(V + Dropout0.2(softmax(Q K^T) V'))`` (``video_query`` / ``video_key`` 512 -> 128,
  ``video_value`` 512 -> 512, no 1/sqrt(d) scaling, ``norm``), while the channel weights multiply the
  raw map V (as the reference); plus a global branch on S: ``g = relu(affine_video_ave(mean_r S))``,
  ``w_g = softmax_r(tanh(ave_v_att(relu(affine_video_3(S_r)) * g)))``,
  ``out = x + beta * sigmoid(sum_r w_g S_r) * x`` with x the AGSCA output. Not built: the registered,
  never run ``ave_bottleneck`` (Linear(512, 256)).
* supervised: ``audio_visual_rnn_layer`` (``RNNEncoder``: BiLSTM 128 -> d/2 per direction for
  audio, BiLSTM 512 -> d per direction for the attended visual; the reference's ``dropout=0.2`` on a
  one-layer LSTM does nothing), then the CMRAN relation blocks of :mod:`train.heads.relation`
  (``video_encoder`` / ``audio_encoder`` = ``InternalTemporalRelationModule`` (4 heads, 2 layers,
  ffn 1024), ``video_decoder`` / ``audio_decoder`` = ``CrossModalRelationAttModule`` (4 heads,
  1 layer, ffn 1024)). The reference builds ``video_encoder`` with ``input_dim=512`` = the visual BiLSTM
  output 2 d only at d = 256; ours uses 2 d.
  weak: no BiLSTM; the encoders read the attended visual (512) and the raw audio (128), encoder ffn
  2048, decoder ffn 1024.
* Time-level background suppression: ``audio_gated`` / ``video_gated`` = Sequential(Linear(d, 1),
  Sigmoid). Supervised: audio_gate from the audio encoder output, video_gate from the video encoder
  output, ``q_v <- q_v + alpha * audio_gate * q_v``, ``q_a <- q_a + alpha * video_gate * q_a``, and
  ``gate = audio_gate * video_gate``. Weak (crossed sources): audio_gate from the VIDEO encoder,
  video_gate from the AUDIO encoder, ``q <- (1 - alpha) q + alpha * gate * q``,
  ``event_gate = (audio_gate + video_gate) / 2``.
* Event-level background suppression (class activation sequences): ``video_cas`` / ``audio_cas``
  Linear(d, C-1) supervised, their top-k (k = 4) means over time averaged into ``av_score``, added as
  ``event_scores += gamma * av_score``; weak: Linear(d, C) whose sigmoids gate the fused CAS
  ``CAS_model`` (Conv1d(d, C, 1, bias=False) = ours ``cas_classifier`` Linear(d, C, bias=False)):
  ``cas = gamma * sigmoid(video_cas) * cas + gamma * sigmoid(audio_cas) * cas``,
  ``raw_logits = top-k mean over time``, per-segment ``event_gate * raw_logits``.
* ``AVInter`` / ``VAInter`` = ``AudioVideoInter`` (:class:`~train.heads.relation.AudioVisualInteraction`,
  4 heads supervised / 2 weak, attention dropout 0.2, residual dropout 0.1), fused = mean of both.
* supervised ``localize_module`` (``SupvLocalizeModule``): ``classifier`` Linear(d, 1) per segment
  (is-event logit), ``event_classifier`` Linear(d, C-1) on the max over time. Not built (registered,
  never run): ``video_norm``, ``audio_norm``; weak: ``classifier`` Linear(d, 1); both: every
  ``DecoderLayer.self_attn`` and the deep-copied ``encoder_layer`` / ``decoder_layer`` templates.

Options (:class:`CMBSConfig`): ``d``, ``heads``, ``att_dim``, ``att_hidden``, ``key_dim``,
``encoder_layers``, ``decoder_layers``, ``dropout``, ``top_k`` for both settings, and the sections
``supervised`` / ``weak`` (:class:`CMBSSettingOptions`: ``alpha``, ``gamma``, ``beta``,
``visual_dropout``, ``ffn_dim``, ``decoder_ffn_dim``, ``inter_heads``) whose reference values differ per
setting (``heads.cmbs.weak.alpha: 0.2`` in pipeline.yaml); a head reads the section of its setting.

Losses (``supv_main.py`` lines 172-183, ``weakly_main.py`` line 163)
-------------------------------------------------------------------
Supervised, returned as ``{"loss", "is_event", "gate", "event", "cas"}`` (loss = the sum):
``BCEWithLogits(is_event_scores, is_event)`` + ``BCEWithLogits(gate, is_event)`` (the reference
applies BCE-WITH-LOGITS to the gate, a product of two sigmoids; kept) + ``CE(event_scores, video class)``
+ ``CE(av_score, video class)``. The reference's video class is the largest foreground index over the
segments (= the video's event class in AVE); ours is ``batch['video_label']``, and background-only videos
(never in the reference's supervised data) are left out of the two CE terms. Segments with ``valid``
False are left out of the BCE terms.
Weak: ``MultiLabelSoftMarginLoss(softmax(max_t event_gate * raw_logits), one-hot video label over
C)`` (the training set adds background-only videos labelled 28); the max over time skips invalid
segments; ``train.weak_pool`` is ignored (:meth:`CMBSHead.weak_pooling` reports "max").

Prediction (``compute_accuracy_supervised`` of both scripts)
------------------------------------------------------------
Supervised: ``sigmoid(is_event) > 0.5`` -> argmax of ``event_scores``, else background.
Weak: the same function is called with ``(event_gate, raw_logits)``: ``sigmoid(event_gate) > 0.5`` holds
for every segment because event_gate is already a probability (> 0), so every segment gets the video's
argmax over all C classes of raw_logits (background when that is class C - 1). We keep that rule.

Schedule (``supv_train.sh``, ``weakly_train.sh``, scripts' ``MultiStepLR`` stepped per epoch)
-----------------------------------------------------------------------------------------------
Supervised: Adam lr 7e-4, batch 64, 200 epochs, milestones (10, 20, 30), gamma 0.5, clip_grad_norm 0.5,
no weight decay (``torch.optim.Adam(params, lr=args.lr)``; ``default_config.yaml``'s weight_decay 5e-4
is never passed to the optimiser). Weak: lr 6e-4, batch 64, 200 epochs, milestones (10, 20, 40),
gamma 0.5, clip 0.5. The reference trains in float64 (``model.double()``); the loop trains in float32.
Seeds of the scripts: 43 (supervised), 666 (weak).

Reference training protocol (``train.protocol: reference``, :data:`REFERENCE_PROTOCOLS`): supv_main.py
trains every epoch on ``DataLoader(shuffle=True)`` batches of 64, the last partial one kept (lines
79-85), ``model.train()``, loss, ``backward``, ``clip_grad_norm_(0.5)``, ``step``, ``zero_grad``
(lines 151-199); evaluates TEST after every epoch (``eval_freq`` 1 of configs/default_config.yaml,
lines 127-128) and keeps the strictly better epoch; ``MultiStepLR.step()`` after the evaluation
(line 141). weakly_main.py: the same (lines 114-131). tests/test_training_parity.py trains the
reference transcription and avel side by side.

Reported AVE accuracy: 79.3 supervised / 74.2 weak (CMBS paper, as quoted in the issue; the repository
README gives no numbers).

Parameter counts at the defaults with C = 29 (tests/test_cmbs_parity.py): supervised: reference
``supv_main_model`` registers 13,544,537, of which 9,200,473 receive a gradient (= ours); weak:
``weak_main_model`` registers 14,789,439, of which 9,395,518 receive a gradient (= ours). The
difference is the idle layers listed above (tests/test_cmbs_parity.py IDLE_SUPERVISED / IDLE_WEAK).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..protocol import Protocol
from ..registry import register_head
from .base import Head, HeadOutput
from .layers import BiLSTM, gated_predict, gated_segment_scores, masked_mean, pool_over_time, valid_mask
from .relation import (AudioGuidedSpatialChannelAttention, AudioVisualInteraction, CrossModalRelationAttention,
                       InternalTemporalRelation)

AUDIO_DIM = 128
VISUAL_DIM = 512
#: AudioVideoInter: attention-weight dropout (head_dropout 0.2) and residual dropout (0.1)
INTER_ATTN_DROPOUT = 0.2
INTER_DROPOUT = 0.1
#: dropout of the region self-attention residual in the attention (New_Audio_Guided_Attention.dropout)
ATTENTION_DROPOUT = 0.2

#: supv_train.sh (lr, clip, epochs, batch) + supv_main.py (Adam, MultiStepLR([10, 20, 30], 0.5))
SUPERVISED_SCHEDULE = {"lr": 7e-4, "batch_size": 64, "epochs": 200, "lr_step": None, "milestones": (10, 20, 30),
                       "lr_gamma": 0.5, "weight_decay": 0.0, "grad_clip": 0.5}
#: weakly_train.sh + weakly_main.py (MultiStepLR([10, 20, 40], 0.5))
WEAK_SCHEDULE = {"lr": 6e-4, "batch_size": 64, "epochs": 200, "lr_step": None, "milestones": (10, 20, 40),
                 "lr_gamma": 0.5, "weight_decay": 0.0, "grad_clip": 0.5}

_CMBS_NOTES = ("the script trains and evaluates in float64 (model.double(), features read as float64); avel trains "
               "in float32",
               "DataLoader(shuffle=True) draws each epoch's permutation from torch's global generator, which also "
               "drives dropout; avel draws it from the run's own generator")
#: ``train.protocol: reference``: supv_main.py / weakly_main.py (module docstring)
REFERENCE_PROTOCOLS = {
    "supervised": Protocol("reference", script="marmot-xy/CMBS supv_main.py", shuffle=True, drop_last=False,
                           select_on="test", eval_first=1, eval_every=1, eval_last=True, keep="better", notes=_CMBS_NOTES),
    "weak": Protocol("reference", script="marmot-xy/CMBS weakly_main.py", shuffle=True, drop_last=False,
                     select_on="test", eval_first=1, eval_every=1, eval_last=True, keep="better", notes=_CMBS_NOTES),
}


# ----------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class CMBSSettingOptions:
    """Options whose reference values differ between the settings (defaults: supervised,
    ``configs/main.json`` + ``supv_main_model``)."""

    #: strength of the time-level gates on the decoder outputs (main.json 0.1, weak.json 0.2)
    alpha: float = 0.1
    #: weight of the event-level CAS branch (main.json 0.3, weak.json 0.5)
    gamma: float = 0.3
    #: weight of the global self-attention branch of the attention (main.json 0.4, weak.json 0.5);
    #: 0 leaves that branch out
    beta: float = 0.4
    #: dropout after ``v_fc`` + ReLU (supervised 0.2, weak 0.1)
    visual_dropout: float = 0.2
    #: feed-forward width of the internal temporal relation encoders (supervised 1024, weak 2048)
    ffn_dim: int = 1024
    #: feed-forward width of the cross-modal relation decoders (1024 in both)
    decoder_ffn_dim: int = 1024
    #: heads of AVInter / VAInter (supervised 4, weak 2)
    inter_heads: int = 4


def weak_setting_options() -> CMBSSettingOptions:
    """``configs/weak.json`` + ``weak_main_model``."""
    return CMBSSettingOptions(alpha=0.2, gamma=0.5, beta=0.5, visual_dropout=0.1, ffn_dim=2048,
                              decoder_ffn_dim=1024, inter_heads=2)


@dataclasses.dataclass
class RelationModelOptions:
    """The options CMBS and CACE-Net share (the relation model of ``main_model.py``)."""

    #: model width (``d_model``)
    d: int = 256
    #: heads of the relation encoders / decoders (reference 4)
    heads: int = 4
    #: channel-attention width of the attention (``affine_video_1`` / ``affine_audio_1``: 512)
    att_dim: int = 512
    #: bottleneck / spatial / global-branch width of the attention (``affine_bottleneck``,
    #: ``affine_video_2``, ``affine_video_ave``, ``affine_video_3``: 256)
    att_hidden: int = 256
    #: query / key width of the region self-attention (512 // latent_dim 4 = 128)
    key_dim: int = 128
    #: encoder layers of each internal temporal relation module (``num_layers=2``)
    encoder_layers: int = 2
    #: decoder layers of each cross-modal relation attention module (``num_layers=1``)
    decoder_layers: int = 1
    #: dropout of the relation encoder / decoder layers (attention and residual; 0.1)
    dropout: float = 0.1
    #: segments averaged by the top-k pooling of the class activation sequences (reference 4)
    top_k: int = 4


@dataclasses.dataclass
class CMBSConfig(RelationModelOptions):
    """Options of :class:`CMBSHead` (defaults = the reference AVE configuration); ``supervised`` /
    ``weak`` hold the options whose reference values differ per setting (only the section of the
    head's setting is used)."""

    supervised: CMBSSettingOptions = dataclasses.field(default_factory=CMBSSettingOptions)
    weak: CMBSSettingOptions = dataclasses.field(default_factory=weak_setting_options)


# ----------------------------------------------------------------------------------------------
# building blocks


class CrossModalGatedAttention(AudioGuidedSpatialChannelAttention):
    """CMBS ``New_Audio_Guided_Attention(beta)`` with its layer names: AGSCA (the parent class)
    whose channel query is the region self-attention S of the map, plus the ``beta`` global branch
    (see the module docstring).

    forward(audio [B, T, Da], visual [B, T, H, W, Dv] or [B, T, R, Dv]) ->
    (attended [B, T, Dv], spatial weights w_s [B, T, R], global weights w_g [B, T, R] or None when
    beta = 0, self-attended map S [B, T, R, Dv])."""

    def __init__(self, beta: float, channel_dim: int = 512, hidden: int = 256, key_dim: int = 128,
                 audio_dim: int = AUDIO_DIM, visual_dim: int = VISUAL_DIM, dropout: float = ATTENTION_DROPOUT):
        super().__init__(audio_dim, visual_dim, channel_dim, hidden)
        self.beta = beta
        self.video_query = nn.Linear(visual_dim, key_dim)
        self.video_key = nn.Linear(visual_dim, key_dim)
        self.video_value = nn.Linear(visual_dim, visual_dim)
        self.norm = nn.LayerNorm(visual_dim)
        self.dropout = nn.Dropout(dropout)
        if beta != 0:
            self.affine_video_ave = nn.Linear(visual_dim, hidden)
            self.affine_video_3 = nn.Linear(visual_dim, hidden)
            self.ave_v_att = nn.Linear(hidden, 1)

    def self_attend(self, regions: torch.Tensor, query: nn.Linear, key: nn.Linear, value: nn.Linear) -> torch.Tensor:
        """Region self-attention of each segment: ``norm(V + dropout(softmax(q(V) k(V)^T) v(V)))``
        (no 1/sqrt(d) scaling, as the reference). regions [B, T, R, Dv] -> [B, T, R, Dv]."""
        energy = query(regions) @ key(regions).transpose(-1, -2)  # [B, T, R, R]
        return self.norm(regions + self.dropout(energy.softmax(dim=-1) @ value(regions)))

    def global_weights(self, selfatt: torch.Tensor) -> torch.Tensor:
        """w_g [B, T, R]: spatial weights of S guided by its own region average."""
        average = F.relu(self.affine_video_ave(selfatt.mean(dim=-2))).unsqueeze(-2)
        joint = F.relu(self.affine_video_3(selfatt)) * average
        return torch.tanh(self.ave_v_att(joint)).squeeze(-1).softmax(dim=-1)

    def gate(self, attended: torch.Tensor, selfatt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x + beta * sigmoid(sum_r w_g S_r) * x`` (x = AGSCA output [B, T, Dv]) and w_g."""
        if self.beta == 0:
            return attended, None
        weights = self.global_weights(selfatt)
        glob = torch.einsum("btr,btrd->btd", weights, selfatt)
        return attended + self.beta * torch.sigmoid(glob) * attended, weights

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):  # type: ignore[override]
        regions = self.regions(visual)
        selfatt = self.self_attend(regions, self.video_query, self.video_key, self.video_value)
        attended, spatial = self.attend(audio, regions, channel_query=selfatt)
        attended, glob = self.gate(attended, selfatt)
        return attended, spatial, glob, selfatt


class RNNEncoder(nn.Module):
    """Reference ``RNNEncoder(audio_dim, video_dim, d_model, 1)``: BiLSTM(audio_dim, d/2) and
    BiLSTM(video_dim, d). forward(audio [B, T, Da], visual [B, T, Dv]) -> ([B, T, d], [B, T, 2 d])."""

    def __init__(self, audio_dim: int, visual_dim: int, d: int):
        super().__init__()
        if d % 2:
            raise ValueError(f"d = {d} must be even (the audio BiLSTM has d / 2 units per direction)")
        self.audio_rnn = BiLSTM(audio_dim, d // 2)
        self.visual_rnn = BiLSTM(visual_dim, d)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.audio_rnn(audio), self.visual_rnn(visual)


class LocalizeModule(nn.Module):
    """Reference ``SupvLocalizeModule(d_model)``: per-segment is-event logit ``classifier(x)`` and the
    event logits ``event_classifier(max_t x)``. forward(x [B, T, d]) -> ([B, T], [B, C-1])."""

    def __init__(self, d: int, events: int):
        super().__init__()
        self.classifier = nn.Linear(d, 1)
        self.event_classifier = nn.Linear(d, events)

    def forward(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(fused).squeeze(-1), self.event_classifier(fused.max(dim=1).values)


def top_k_mean(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values over time (all T when T < k): [B, T, K] -> [B, K]."""
    return scores.topk(min(k, scores.shape[1]), dim=1).values.mean(dim=1)


def gate_layer(d: int) -> nn.Sequential:
    """``nn.Sequential(nn.Linear(d, 1), nn.Sigmoid())`` (reference ``audio_gated`` / ``video_gated``)."""
    return nn.Sequential(nn.Linear(d, 1), nn.Sigmoid())


def check_inputs(name: str, audio: torch.Tensor, visual: torch.Tensor) -> None:
    if audio.dim() != 3 or audio.shape[-1] != AUDIO_DIM:
        raise ValueError(f"head {name!r}: audio must be [B, T, {AUDIO_DIM}], got {list(audio.shape)}")
    if visual.dim() != 5 or visual.shape[-1] != VISUAL_DIM or visual.shape[:2] != audio.shape[:2]:
        raise ValueError(f"head {name!r}: visual must be [B, T, H, W, {VISUAL_DIM}] with the audio's B, T = "
                         f"{list(audio.shape[:2])}, got {list(visual.shape)}")


def map_extras(weights: torch.Tensor | None, visual: torch.Tensor) -> torch.Tensor | None:
    """Region weights [B, T, R] as maps [B, T, H, W] of the visual input's grid."""
    return None if weights is None else weights.reshape(*weights.shape[:2], *visual.shape[2:4])


# ----------------------------------------------------------------------------------------------
# the supervised machinery shared with CACE-Net


class SupervisedRelationHead(Head):
    """What CMBS's ``supv_main_model`` and CACE-Net's ``supv_main_model`` share: the BiLSTMs, the
    relation encoders / decoders, the time-level gates, the CAS branch, the audio-visual interaction,
    the supervised loss and prediction rule. Subclasses call :meth:`build_supervised` with an options
    object holding ``alpha``, ``gamma``, ``ffn_dim``, ``decoder_ffn_dim``, ``inter_heads`` and the
    head's config (``d``, ``heads``, ``encoder_layers``, ``decoder_layers``, ``dropout``, ``top_k``)."""

    def build_relation(self, audio_dim: int, visual_dim: int, options: Any) -> None:
        """The four relation modules of both settings, reading audio_dim / visual_dim features."""
        cfg = self.config
        self.video_encoder = InternalTemporalRelation(visual_dim, cfg.d, cfg.heads, options.ffn_dim, cfg.encoder_layers,
                                                      cfg.dropout)
        self.video_decoder = CrossModalRelationAttention(visual_dim, cfg.d, cfg.heads, options.decoder_ffn_dim,
                                                         cfg.decoder_layers, cfg.dropout)
        self.audio_encoder = InternalTemporalRelation(audio_dim, cfg.d, cfg.heads, options.ffn_dim, cfg.encoder_layers,
                                                      cfg.dropout)
        self.audio_decoder = CrossModalRelationAttention(audio_dim, cfg.d, cfg.heads, options.decoder_ffn_dim,
                                                         cfg.decoder_layers, cfg.dropout)

    def build_supervised(self, options: Any) -> None:
        self.options = options
        d = self.config.d
        events = self.num_classes - 1
        self.audio_visual_rnn_layer = RNNEncoder(AUDIO_DIM, VISUAL_DIM, d)
        self.build_relation(d, 2 * d, options)
        self.audio_gated = gate_layer(d)
        self.video_gated = gate_layer(d)
        self.AVInter = AudioVisualInteraction(d, options.inter_heads, INTER_ATTN_DROPOUT, INTER_DROPOUT)
        self.VAInter = AudioVisualInteraction(d, options.inter_heads, INTER_ATTN_DROPOUT, INTER_DROPOUT)
        self.audio_cas = nn.Linear(d, events)
        self.video_cas = nn.Linear(d, events)

    def supervised_trunk(self, audio: torch.Tensor, visual: torch.Tensor, top_k: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """audio [B, T, 128], attended visual [B, T, 512] -> (fused [B, T, d], gate = audio_gate *
        video_gate [B, T], av_score [B, C-1])."""
        audio_seq, visual_seq = self.audio_visual_rnn_layer(audio, visual)  # [B, T, d], [B, T, 2d]
        video_kv = self.video_encoder(visual_seq)
        audio_query = self.audio_decoder(audio_seq, video_kv)
        audio_kv = self.audio_encoder(audio_seq)
        video_query = self.video_decoder(visual_seq, audio_kv)
        audio_gate, video_gate = self.audio_gated(audio_kv), self.video_gated(video_kv)  # [B, T, 1]
        alpha = self.options.alpha
        video_query = video_query + audio_gate * video_query * alpha
        audio_query = audio_query + video_gate * audio_query * alpha
        av_score = (top_k_mean(self.video_cas(video_query), top_k) + top_k_mean(self.audio_cas(audio_query), top_k)) / 2
        video_query = self.AVInter(video_query, audio_query)
        audio_query = self.VAInter(audio_query, video_query)
        return (video_query + audio_query) / 2, (audio_gate * video_gate).squeeze(-1), av_score

    def supervised_output(self, is_event: torch.Tensor, event: torch.Tensor, gate: torch.Tensor,
                          av_score: torch.Tensor, extras: dict[str, torch.Tensor]) -> HeadOutput:
        extras.update({"is_event_scores": is_event, "event_scores": event, "gate": gate, "cas_scores": av_score})
        return HeadOutput(scores=gated_segment_scores(is_event, event, self.num_classes), extras=extras)

    def supervised_loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The four terms of ``supv_main.py`` (see the module docstring) and their sum."""
        is_event = out.extras["is_event_scores"]
        valid = valid_mask(batch, is_event)
        background = self.num_classes - 1
        target = (batch["labels"].to(is_event.device) != background).to(is_event.dtype)
        video_label = batch["video_label"].to(is_event.device)
        has_event = video_label != background
        event_target = video_label.clamp_max(background - 1)

        def event_ce(logits: torch.Tensor) -> torch.Tensor:
            per_video = F.cross_entropy(logits, event_target, reduction="none")
            return (per_video * has_event).sum() / has_event.sum().clamp_min(1)

        def segment_bce(logits: torch.Tensor) -> torch.Tensor:
            return masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), valid)

        terms = {
            "is_event": segment_bce(is_event),
            "gate": segment_bce(out.extras["gate"]),  # BCE-with-logits of a probability, as the reference
            "event": event_ce(out.extras["event_scores"]),
            "cas": event_ce(out.extras["cas_scores"]),
        }
        return {"loss": terms["is_event"] + terms["gate"] + terms["event"] + terms["cas"], **terms}

    def supervised_predict(self, out: HeadOutput) -> torch.Tensor:
        """``compute_accuracy_supervised``: sigmoid(is_event) > 0.5 -> argmax event_scores, else C - 1
        (:func:`train.heads.layers.gated_predict`, not inclusive)."""
        return gated_predict(out.extras["is_event_scores"], out.extras["event_scores"], self.num_classes,
                             inclusive=False)


# ----------------------------------------------------------------------------------------------
# the head


@register_head("cmbs")
class CMBSHead(SupervisedRelationHead):
    """CMBS (Xia and Zhao, CVPR 2022; marmot-xy/CMBS): cross-modal background suppression (gates + CAS).

    Cross-modal gated attention, BiLSTMs (supervised), CMRAN relation blocks, time-level gates,
    event-level CAS suppression, audio-visual interaction. Reported on AVE: 79.3 supervised, 74.2 weak.

    forward(audio [B, T, 128], visual [B, T, H, W, 512]) -> HeadOutput(scores [B, T, C], extras; see the
    module docstring). Parameters at the defaults, C = 29: supervised 9,200,473 (the reference
    registers 13,544,537), weak 9,395,518 (reference 14,789,439)."""

    Config = CMBSConfig
    train_defaults = SUPERVISED_SCHEDULE
    weak_train_defaults = WEAK_SCHEDULE
    reference_protocols = REFERENCE_PROTOCOLS

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        opts = cfg.weak if setting == "weak" else cfg.supervised
        self.v_fc = nn.Linear(VISUAL_DIM, VISUAL_DIM)
        self.dropout = nn.Dropout(opts.visual_dropout)
        self.spatial_channel_att = CrossModalGatedAttention(opts.beta, cfg.att_dim, cfg.att_hidden, cfg.key_dim)
        if setting == "supervised":
            self.build_supervised(opts)
            self.localize_module = LocalizeModule(cfg.d, num_classes - 1)
            return
        self.options = opts
        d = cfg.d
        self.build_relation(AUDIO_DIM, VISUAL_DIM, opts)
        self.AVInter = AudioVisualInteraction(d, opts.inter_heads, INTER_ATTN_DROPOUT, INTER_DROPOUT)
        self.VAInter = AudioVisualInteraction(d, opts.inter_heads, INTER_ATTN_DROPOUT, INTER_DROPOUT)
        self.audio_gated = gate_layer(d)
        self.video_gated = gate_layer(d)
        self.cas_classifier = nn.Linear(d, num_classes, bias=False)  # reference CAS_model: Conv1d(d, C, 1, bias=False)
        self.audio_cas = nn.Linear(d, num_classes)
        self.video_cas = nn.Linear(d, num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        check_inputs(self.name, audio, visual)
        v = self.dropout(F.relu(self.v_fc(visual)))
        attended, spatial, glob, _ = self.spatial_channel_att(audio, v)
        extras = {} if glob is None else {"global_attention": map_extras(glob, visual)}
        if self.setting == "weak":
            out = self.weak_forward(audio, attended, extras)
        else:
            fused, gate, av_score = self.supervised_trunk(audio, attended, self.config.top_k)
            is_event, event = self.localize_module(fused)
            event = event + self.options.gamma * av_score
            out = self.supervised_output(is_event, event, gate, av_score, extras)
        out.spatial = map_extras(spatial, visual)
        return out

    def weak_forward(self, audio: torch.Tensor, visual: torch.Tensor, extras: dict[str, torch.Tensor]) -> HeadOutput:
        """``weak_main_model.forward`` after the attention: audio [B, T, 128], attended visual [B, T, 512]."""
        opts = self.options
        video_kv = self.video_encoder(visual)
        audio_query = self.audio_decoder(audio, video_kv)
        audio_kv = self.audio_encoder(audio)
        video_query = self.video_decoder(visual, audio_kv)
        audio_gate, video_gate = self.audio_gated(video_kv), self.video_gated(audio_kv)  # crossed, as the reference
        event_gate = (audio_gate + video_gate) / 2  # [B, T, 1]
        video_query = (1 - opts.alpha) * video_query + audio_gate * video_query * opts.alpha
        audio_query = (1 - opts.alpha) * audio_query + video_gate * audio_query * opts.alpha
        video_cas_gate = torch.sigmoid(self.video_cas(video_query))  # [B, T, C]
        audio_cas_gate = torch.sigmoid(self.audio_cas(audio_query))
        video_query = self.AVInter(video_query, audio_query)
        audio_query = self.VAInter(audio_query, video_query)
        cas = self.cas_classifier((video_query + audio_query) / 2)
        cas = opts.gamma * video_cas_gate * cas + opts.gamma * audio_cas_gate * cas
        raw_logits = top_k_mean(cas, self.config.top_k)  # [B, C]
        extras.update({"event_gate": event_gate.squeeze(-1), "event_scores": raw_logits})
        return HeadOutput(scores=event_gate * raw_logits.unsqueeze(1), extras=extras)

    def weak_pooling(self, requested: str) -> str:
        """``train.weak_pool`` is ignored: the reference max-pools the gated logits over time."""
        return "max"

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean"):
        """Supervised: the dict of :meth:`supervised_loss`. Weak: MultiLabelSoftMarginLoss of
        softmax(max over valid segments of the gated logits) against the one-hot video label."""
        if self.setting == "supervised":
            return self.supervised_loss(out, batch)
        valid = valid_mask(batch, out.scores)
        video = pool_over_time(out.scores, valid, "max").softmax(dim=-1)
        target = F.one_hot(batch["video_label"].to(video.device), self.num_classes).to(video.dtype)
        per_video = F.multilabel_soft_margin_loss(video, target, reduction="none")
        return masked_mean(per_video, valid.any(dim=1))

    def predict(self, out: HeadOutput) -> torch.Tensor:
        """Supervised: :meth:`supervised_predict`. Weak: the reference's rule on (event_gate, raw_logits):
        sigmoid(event_gate) > 0.5 (always, see the module docstring) -> argmax raw_logits, else C - 1."""
        if self.setting == "supervised":
            return self.supervised_predict(out)
        return gated_predict(out.extras["event_gate"], out.extras["event_scores"], self.num_classes, inclusive=False)
