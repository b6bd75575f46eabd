"""The AVEL heads of Tian et al., ECCV 2018 ("Audio-Visual Event Localization in Unconstrained
Videos"), matched to the public reference code YapengTian/AVE-ECCV18.

Inputs and outputs of every head here (T = segments, C = classes incl. background, AVE: 29)::

    audio  [B, T, 128]        VGGish per segment
    visual [B, T, 7, 7, 512]  VGG-19 pool5 per segment, channels last (as the public h5 files)
    -> HeadOutput.scores [B, T, C] logits (softmax gives the reference model's output)
       HeadOutput.spatial [B, T, 7, 7]  AGVA weights (heads that attend; None otherwise)

Building blocks
---------------
* AGVA (:class:`train.heads.layers.AudioGuidedVisualAttention`), audio-guided visual attention, eq. 2-4, layer by layer as ``att_Net`` in
  ``models.py``: ``U_a = ReLU(Linear(128, 512))``, ``U_v = ReLU(Linear(512, 512))`` applied to each of
  the k = 49 region vectors (``video.view(B*T, -1, 512)``: regions in row-major (h, w) order),
  ``W_v = Linear(512, 49, bias=False)``, ``W_a = Linear(512, 49, bias=False)``,
  ``W_f = Linear(49, 1, bias=False)``, softmax over the 49 regions, and the context vector is the
  weighted sum of the RAW pool5 region vectors (not of ``U_v``). One detail differs between paper and
  code: eq. 4 adds ``W_a U_a(a)`` along the axis that ``W_f`` sums over, the reference adds it along
  the region axis (``affine_g(a_t).unsqueeze(2)``). ``audio_term_axis="region"`` (default) follows
  the code, ``"hidden"`` the paper.
* Temporal modelling: one-layer BiLSTM per stream, hidden 128 (output 256), zero initial state,
  batch_first (``lstm_audio``: 128 -> 2x128, ``lstm_video``: 512 -> 2x128).
* Classifier of ``att_Net``: ``L2(ReLU(L1(ReLU(h))))`` with ``L1 = Linear(in, 64)``,
  ``L2 = Linear(64, C)``; the reference applies softmax at the end, we return the logits.

Heads (``avel-train --list-heads``)
-----------------------------------
* Model variants of Table 1: ``a``, ``v`` (global average pooled visual map), ``v-att``, ``a+v``,
  ``a+v-att`` (the reference ``att_Net``; ``concat-late`` is the same model: Table 1 says its A+V
  models fuse by concatenating the LSTM outputs, Table 2's Concat/late = Table 1's A+V-att = 72.7).
* Fusion methods of Table 2 (:mod:`train.heads.fusion`), named ``<method>-<position>`` with method
  in additive, maxpool, gated, mb, gmu, gmb, concat, mrn, dmrn and position in early, late,
  decision; the late DMRN is called ``dmrn`` (the reference ``TBMRF_Net(128, 128, 512, 29, 1)``), and
  ``dmrfe`` is the late-only ensemble variant. All fusion heads attend (AGVA) first, as the paper's
  Table 2 methods "all use same audio and visual features".

  - early: ``fuse(audio, v_att)`` [fusion_dim] -> one BiLSTM -> ``L2 = Linear(2*hidden, C)``
  - late: ``fuse(BiLSTM_a(audio), BiLSTM_v(v_att))`` [fusion_dim] -> ``L2 = Linear(fusion_dim, C)``
    (the reference DMRN exactly: its ``L2`` is ``Linear(256, 29)``)
  - decision: ``fuse(m_a, m_v)`` [C] -> ``L2 = Linear(C, C)``, where ``m_a``, ``m_v`` are the
    pre-softmax outputs of the A and V-att models (BiLSTM + att_Net classifier per stream)

Losses and weak supervision (what the reference trains with)
------------------------------------------------------------
``supervised_main.py``: the model ends in softmax and is trained with
``nn.MultiLabelSoftMarginLoss()(probs, one_hot_labels)`` on [B, 10, 29] (a sigmoid BCE on the
softmax probabilities, averaged over all entries). ``weak_supervised_main.py`` + ``models_weakly.py``:
``score = L2(...)`` [B, 10, 29] logits, MIL pooling = ``MaxPool1d`` over time of the LOGITS, then
softmax, then the same MultiLabelSoftMarginLoss against the one-hot video label (``mil_labels.h5``:
exactly one 1 per video, background 28 for the added background-only videos); at test time the
per-segment ``score`` is argmaxed. Paper eq. 7 instead averages the last-FC outputs m_t over time,
then softmax. Our heads reproduce this: ``loss="reference"`` (default) is the MultiLabelSoftMargin
on softmax probabilities, ``loss="ce"`` is cross-entropy on the logits; in the weak setting the
logits are pooled over time (``weak_pool`` "mean" = eq. 7, "max" = reference code), then either
loss is applied to the pooled [B, C] scores. Segments with ``valid`` False are left out of the loss
and of the pooling.

Reference training protocol (``train.protocol: reference``, :data:`REFERENCE_PROTOCOLS`)
-----------------------------------------------------------------------------------------
``supervised_main.py`` (HEAD 4660337): batches in ONE fixed order every epoch (``train_order.h5``,
which is the order of ``trainSet.txt`` and of avel's AVE train manifest; dataloader.py:31-41),
``len // 64`` batches (the last 11 of 3339 videos are never trained on), ``net_model.zero_grad()``,
loss, ``backward()``, ``scheduler.step()`` THEN ``optimizer.step()`` per batch (lines 102-108),
evaluation of ``val_order.h5`` after 0-based epochs 0, 5, 10, ... (``epoch % 5 == 0``, lines 114-118),
the model saved when the val accuracy is strictly higher, and test evaluated once with the saved
model. (Commit 18eaa10 read ``test_order.h5`` in ``val()``; 19d6eaa changed it to the val order.)
``weak_supervised_main.py``: the same loop over train + the 178 background-only videos (appended
after the train videos), ``best_val_acc`` never updated (the last evaluation is kept). The scripts
build only att_Net (``a+v-att``, ``concat-late``; both settings) and TBMRF_Net (``dmrn``,
supervised), so only these heads have the protocol.
tests/test_training_parity.py trains the reference transcription and avel side by side.

Schedule (``train_defaults``): Adam lr 1e-3, batch 64, 300 epochs, no weight decay; the reference's
``StepLR(step_size=15000, gamma=0.1)`` steps per ITERATION: with 3339 training videos and the last
partial batch dropped that is 52 batches/epoch, so the decay lands after epoch 288 (``lr_step=288``).
Weak setting (``weak_train_defaults``): 250 epochs (``--nb_epoch`` default of
``weak_supervised_main.py``); its 15000-iteration decay falls after the last epoch, so no decay.
The reference DMRN checkpoint was trained by fine-tuning the A+V-att model (``supervised_main.py``
comment); we train it from scratch with the same schedule.

Parameter counts at the defaults with C = 29 (checked against the reference layer sizes in
tests/test_avel_parity.py and tests/test_heads_avel.py):
``a`` 282,525; ``v`` 675,741; ``v-att`` 1,054,670; ``a+v`` 956,317; ``a+v-att`` 1,335,246 (= att_Net);
``dmrn`` 1,571,150 (= TBMRF_Net with nb_block=1).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..protocol import Protocol
from ..registry import register_head
from .base import Head, HeadOutput
from .fusion import DMRN, FUSIONS, RESIDUAL, make_fusion
from .layers import AudioGuidedVisualAttention, BiLSTM, masked_mean, pool_over_time

log = logging.getLogger(__name__)

AUDIO_DIM = 128
VISUAL_DIM = 512

#: supervised schedule of supervised_main.py (see the module docstring for lr_step)
SUPERVISED_SCHEDULE = {"lr": 1e-3, "batch_size": 64, "epochs": 300, "lr_step": 288, "lr_gamma": 0.1, "weight_decay": 0.0}
#: weak schedule of weak_supervised_main.py
WEAK_SCHEDULE = {"lr": 1e-3, "batch_size": 64, "epochs": 250, "lr_step": None, "lr_gamma": 0.1, "weight_decay": 0.0}

#: ``train.protocol: reference`` (see the module docstring, "Reference training protocol")
REFERENCE_PROTOCOLS = {
    "supervised": Protocol(
        "reference", script="YapengTian/AVE-ECCV18 supervised_main.py", shuffle=False, drop_last=True,
        select_on="val", eval_first=1, eval_every=5, eval_last=False, keep="better",
        schedule={"lr_step": 15000, "lr_step_unit": "iteration"},
        notes=("val() switches the model to eval mode and train() never switches it back; att_Net and TBMRF_Net "
               "have no dropout or batch norm, so this changes nothing (avel trains in train mode)",)),
    "weak": Protocol(
        "reference", script="YapengTian/AVE-ECCV18 weak_supervised_main.py", shuffle=False, drop_last=True,
        select_on="val", eval_first=1, eval_every=5, eval_last=False, keep="positive",
        schedule={"lr_step": 15000, "lr_step_unit": "iteration"},
        notes=("best_val_acc is never updated (weak_supervised_main.py:103-104), so every evaluation with a val "
               "accuracy above 0 overwrites the saved model: the kept epoch is the last evaluated one",)),
}

POSITIONS = ("early", "late", "decision")

#: accuracy (%) reported in Tian et al. Table 2 per (method, position), for the head descriptions
TABLE2 = {
    (method, position): acc
    for position, row in (
        ("early", (59.9, 67.9, 67.9, 69.2, 70.5, 70.2, 61.0, 69.8, 68.0)),
        ("late", (71.3, 71.4, 70.5, 70.5, 71.6, 71.0, 72.7, 70.8, 73.1)),
        ("decision", (70.5, 64.5, 65.2, 64.6, 67.6, 67.3, 69.7, 63.8, 70.4)),
    )
    for method, acc in zip(("additive", "maxpool", "gated", "mb", "gmu", "gmb", "concat", "mrn", "dmrn"), row)
}


# ----------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class AvelConfig:
    """Options every Tian et al. head uses (defaults = the reference ``att_Net(128, 128, 512, 29)``).

    Each head's Config adds only the option groups its layers use (the mixins below), so an
    option a head would ignore is an unknown key for it."""

    #: BiLSTM hidden size per direction (reference ``hidden_dim``)
    hidden: int = 128
    #: "reference": MultiLabelSoftMarginLoss on softmax probabilities; "ce": cross-entropy
    loss: Literal["reference", "ce"] = "reference"


@dataclasses.dataclass
class AttentionOptions:
    """AGVA options (heads that attend over the visual map)."""

    #: width d of U_a / U_v in the attention (reference ``hidden_size``)
    att_dim: int = 512
    #: the visual map is grid x grid regions (k = grid**2 = 49)
    grid: int = 7
    #: where eq. 4's audio term is broadcast: "region" (reference code) or "hidden" (paper)
    audio_term_axis: Literal["region", "hidden"] = "region"


@dataclasses.dataclass
class ClassifierOptions:
    """The ``att_Net`` classifier (heads that end in, or fuse the outputs of, ``MLPClassifier``)."""

    #: width of the classifier's hidden layer L1 (reference 64)
    classifier_hidden: int = 64


@dataclasses.dataclass
class FusionOptions:
    """Fusion width of the early and late positions (the decision position fuses at C)."""

    #: width of the fused vector; DMRN's late fusion is residual over the BiLSTM outputs, so the
    #: reference has fusion_dim = 2 * hidden
    fusion_dim: int = 256


@dataclasses.dataclass
class BlockOptions:
    """Depth of the fusion methods built of residual blocks (MRN, DMRN)."""

    #: residual blocks of MRN / DMRN (the paper uses one)
    blocks: int = 1


@dataclasses.dataclass
class VariantConfig(ClassifierOptions, AvelConfig):
    """Options of the Table 1 variants without attention (``a``, ``v``, ``a+v``)."""


@dataclasses.dataclass
class AttendedVariantConfig(AttentionOptions, ClassifierOptions, AvelConfig):
    """Options of the Table 1 variants with AGVA (``v-att``, ``a+v-att``, ``concat-late``)."""


@dataclasses.dataclass
class EnsembleConfig(AttentionOptions, AvelConfig):
    """Options of ``dmrfe`` (AGVA, BiLSTMs, two residual blocks of width 2 * hidden)."""


@dataclasses.dataclass
class FusionConfig(FusionOptions, AttentionOptions, AvelConfig):
    """Options of the Table 2 fusion heads at the early and late positions."""


@dataclasses.dataclass
class ResidualFusionConfig(BlockOptions, FusionConfig):
    """Options of the MRN / DMRN fusion heads at the early and late positions."""


@dataclasses.dataclass
class DecisionFusionConfig(ClassifierOptions, AttentionOptions, AvelConfig):
    """Options of the Table 2 fusion heads at the decision position (per-stream classifiers)."""


@dataclasses.dataclass
class ResidualDecisionFusionConfig(BlockOptions, DecisionFusionConfig):
    """Options of the MRN / DMRN fusion heads at the decision position."""


def fusion_config(method: str, position: str) -> type:
    """The Config of fusion ``method`` at ``position``: only the options its layers use."""
    if position == "decision":
        return ResidualDecisionFusionConfig if method in RESIDUAL else DecisionFusionConfig
    return ResidualFusionConfig if method in RESIDUAL else FusionConfig


# ----------------------------------------------------------------------------------------------
# building blocks


class MLPClassifier(nn.Module):
    """``att_Net``'s classifier: [..., in] -> ``L2(ReLU(L1(ReLU(x))))`` [..., C]."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.L1 = nn.Linear(in_dim, hidden)
        self.L2 = nn.Linear(hidden, num_classes)

    def xavier_init(self) -> None:
        nn.init.xavier_uniform_(self.L1.weight)
        nn.init.xavier_uniform_(self.L2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.L2(F.relu(self.L1(F.relu(x))))


# ----------------------------------------------------------------------------------------------
# losses


def classification_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample loss: logits [..., C], target [...] class indices -> [...].

    "reference": MultiLabelSoftMarginLoss of the softmax probabilities against the one-hot target
    (what both reference training scripts minimise), "ce": cross-entropy on the logits."""
    if kind == "reference":
        probs = logits.softmax(dim=-1)
        onehot = F.one_hot(target, logits.shape[-1]).to(probs.dtype)
        return F.binary_cross_entropy_with_logits(probs, onehot, reduction="none").mean(dim=-1)
    if kind == "ce":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").reshape(target.shape)
    raise ValueError(f"loss must be 'reference' or 'ce', got {kind!r}")


def avel_loss(scores: torch.Tensor, batch: Mapping[str, torch.Tensor], setting: str, weak_pool: str, kind: str) -> torch.Tensor:
    """Training loss of the Tian et al. heads; see the module docstring.

    scores [B, T, C]; batch: ``labels`` [B, T], ``video_label`` [B], optional ``valid`` [B, T]."""
    valid = batch.get("valid")
    if setting == "weak":
        pooled = pool_over_time(scores, valid, weak_pool)
        per_video = classification_loss(pooled, batch["video_label"], kind)
        return masked_mean(per_video, None if valid is None else valid.any(1))
    labels = batch["labels"]
    if valid is not None:
        labels = labels.masked_fill(~valid, 0)  # padded segments may carry any label
    return masked_mean(classification_loss(scores, labels, kind), valid)


# ----------------------------------------------------------------------------------------------
# heads


class AvelHead(Head):
    """Common parts of the Tian et al. heads: input checks, the reference losses, schedules."""

    Config: ClassVar[type] = AvelConfig
    train_defaults: ClassVar[dict[str, Any]] = SUPERVISED_SCHEDULE
    #: schedule of the weak setting (weak_supervised_main.py)
    weak_train_defaults: ClassVar[dict[str, Any]] = WEAK_SCHEDULE

    def check_inputs(self, audio: torch.Tensor, visual: torch.Tensor) -> None:
        """Heads that attend need the configured grid x grid map; the others average any map."""
        grid = getattr(self.config, "grid", None)  # AttentionOptions: the attending heads only
        if audio.dim() != 3 or audio.shape[-1] != AUDIO_DIM:
            raise ValueError(f"head {self.name!r}: audio must be [B, T, {AUDIO_DIM}], got {list(audio.shape)}")
        shape_ok = visual.dim() == 5 and visual.shape[-1] == VISUAL_DIM and visual.shape[:2] == audio.shape[:2]
        if not shape_ok or (grid is not None and tuple(visual.shape[2:4]) != (grid, grid)):
            expected = f"{grid}, {grid}" if grid is not None else "H, W"
            raise ValueError(f"head {self.name!r}: visual must be [B, T, {expected}, {VISUAL_DIM}] with the audio's "
                             f"B, T = {list(audio.shape[:2])}, got {list(visual.shape)}")

    def make_attention(self) -> AudioGuidedVisualAttention:
        cfg = self.config
        return AudioGuidedVisualAttention(AUDIO_DIM, VISUAL_DIM, cfg.att_dim, cfg.grid * cfg.grid, cfg.audio_term_axis)

    def attend_map(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AGVA over the g x g map: (v_att [B, T, 512], weights [B, T, g*g])."""
        return self.attention(audio, visual.flatten(2, 3))

    def spatial_map(self, weights: torch.Tensor) -> torch.Tensor:
        """AGVA weights [B, T, g*g] as :attr:`HeadOutput.spatial` [B, T, g, g]."""
        grid = self.config.grid
        return weights.reshape(*weights.shape[:2], grid, grid)

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        return avel_loss(out.scores, batch, self.setting, weak_pool, self.config.loss)


class VariantHead(AvelHead):
    """Table 1 model variants: BiLSTM(s) of hidden 128 + ``att_Net``'s classifier.

    ``uses_audio`` / ``uses_visual`` pick the streams; ``attend`` pools the visual map with AGVA
    (else global average pooling, the paper's V and A+V). Streams are concatenated audio first.
    Initialisation as ``att_Net.init_weights`` (Xavier weights of every Linear, LSTMs default)."""

    Config: ClassVar[type] = AttendedVariantConfig
    uses_audio: ClassVar[bool] = True
    uses_visual: ClassVar[bool] = True
    attend: ClassVar[bool] = True

    def __init__(self, num_classes: int, setting: str = "supervised", config: VariantConfig | None = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        if self.attend:
            self.attention = self.make_attention()
        if self.uses_audio:
            self.lstm_audio = BiLSTM(AUDIO_DIM, cfg.hidden)
        if self.uses_visual:
            self.lstm_video = BiLSTM(VISUAL_DIM, cfg.hidden)
        streams = int(self.uses_audio) + int(self.uses_visual)
        self.classifier = MLPClassifier(2 * cfg.hidden * streams, cfg.classifier_hidden, num_classes)
        if self.attend:
            self.attention.xavier_init()
        self.classifier.xavier_init()

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        self.check_inputs(audio, visual)
        streams, spatial = [], None
        if self.uses_audio:
            streams.append(self.lstm_audio(audio))
        if self.uses_visual:
            if self.attend:
                pooled, weights = self.attend_map(audio, visual)
                spatial = self.spatial_map(weights)
            else:
                pooled = visual.mean(dim=(2, 3))
            streams.append(self.lstm_video(pooled))
        hidden = streams[0] if len(streams) == 1 else torch.cat(streams, dim=-1)
        return HeadOutput(self.classifier(hidden), spatial=spatial)


@register_head("a")
class AudioOnly(VariantHead):
    """A (Table 1: 59.5%, weak 53.4%): audio BiLSTM + att_Net classifier.

    audio [B, T, 128] -> BiLSTM [B, T, 256] -> classifier -> scores [B, T, C].
    The visual input is ignored. 282,525 parameters at C = 29."""

    Config = VariantConfig
    uses_visual = False
    attend = False


@register_head("v")
class VisualOnly(VariantHead):
    """V (Table 1: 55.3%, weak 52.9%): global-average-pooled visual BiLSTM + classifier.

    visual [B, T, 7, 7, 512] -> global average pooling [B, T, 512] -> BiLSTM
    [B, T, 256] -> classifier -> [B, T, C]. The audio input is ignored. 675,741 parameters at C = 29."""

    Config = VariantConfig
    uses_audio = False
    attend = False


@register_head("v-att")
class VisualAttended(VariantHead):
    """V-att (Table 1: 58.6%, weak 55.6%): AGVA-attended visual BiLSTM + classifier.

    AGVA(audio, visual) [B, T, 512] -> BiLSTM [B, T, 256] -> classifier -> [B, T, C]; audio only guides the attention. spatial [B, T, 7, 7].
    1,054,670 parameters at C = 29."""

    uses_audio = False


@register_head("a+v")
class AudioVisual(VariantHead):
    """A+V (Table 1: 71.4%, weak 63.7%): audio and pooled-visual BiLSTMs, concatenated.

    [BiLSTM_a(audio); BiLSTM_v(GAP(visual))] [B, T, 512] -> classifier -> [B, T, C].
    956,317 parameters at C = 29."""

    Config = VariantConfig
    attend = False


@register_head("a+v-att")
class AudioVisualAttended(VariantHead):
    """A+V-att (Table 1: 72.7%, weak 66.7%): the reference att_Net(128, 128, 512, 29).

    As ``att_Net`` of ``models.py`` / ``models_weakly.py``: [BiLSTM_a(audio); BiLSTM_v(AGVA(audio, visual))] [B, T, 512] ->
    ReLU -> L1 (512 -> 64) -> ReLU -> L2 (64 -> C) -> [B, T, C] logits (reference: softmax of these).
    spatial [B, T, 7, 7]. 1,335,246 parameters at C = 29, as att_Net."""

    reference_protocols = REFERENCE_PROTOCOLS  # supervised_main.py / weak_supervised_main.py train att_Net


@register_head("concat-late")
class ConcatLate(AudioVisualAttended):
    """Concat fusion, late (Table 2: 72.7%): the same model as a+v-att.

    Table 1's A+V
    models fuse by concatenating the BiLSTM outputs; same accuracy in both tables):
    audio [B, T, 128], visual [B, T, 7, 7, 512] -> scores [B, T, C]. 1,335,246 parameters at C = 29."""


class FusionHead(AvelHead):
    """A Table 2 fusion method (``method``) at ``position``, on AGVA-attended visual features.

    Initialisation as the reference ``TBMRF_Net``: PyTorch defaults, Xavier weights for ``L2``."""

    Config: ClassVar[type] = FusionConfig
    method: ClassVar[str] = "dmrn"
    position: ClassVar[str] = "late"

    def __init__(self, num_classes: int, setting: str = "supervised", config: FusionConfig | None = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        streams = 2 * cfg.hidden
        blocks = getattr(cfg, "blocks", None)  # BlockOptions: the residual methods only
        self.attention = self.make_attention()
        if self.position == "early":
            self.fusion = make_fusion(self.method, AUDIO_DIM, VISUAL_DIM, cfg.fusion_dim, blocks)
            self.lstm = BiLSTM(cfg.fusion_dim, cfg.hidden)
            self.L2 = nn.Linear(streams, num_classes)
        else:
            self.lstm_audio = BiLSTM(AUDIO_DIM, cfg.hidden)
            self.lstm_video = BiLSTM(VISUAL_DIM, cfg.hidden)
            if self.position == "late":
                self.fusion = make_fusion(self.method, streams, streams, cfg.fusion_dim, blocks)
                self.L2 = nn.Linear(cfg.fusion_dim, num_classes)
            elif self.position == "decision":
                self.classifier_audio = MLPClassifier(streams, cfg.classifier_hidden, num_classes)
                self.classifier_video = MLPClassifier(streams, cfg.classifier_hidden, num_classes)
                self.fusion = make_fusion(self.method, num_classes, num_classes, num_classes, blocks)
                self.L2 = nn.Linear(num_classes, num_classes)
            else:
                raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        nn.init.xavier_uniform_(self.L2.weight)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        self.check_inputs(audio, visual)
        attended, weights = self.attend_map(audio, visual)
        if self.position == "early":
            fused = self.lstm(self.fusion(audio, attended))
        else:
            h_a = self.lstm_audio(audio)
            h_v = self.lstm_video(attended)
            if self.position == "decision":
                h_a, h_v = self.classifier_audio(h_a), self.classifier_video(h_v)
            fused = self.fusion(h_a, h_v)
        return HeadOutput(self.L2(fused), spatial=self.spatial_map(weights))


def _fusion_docstring(method: str, position: str, paper_name: str) -> str:
    shapes = {
        "early": "fuse(audio [B,T,128], AGVA v_att [B,T,512]) [B,T,fusion_dim] -> BiLSTM [B,T,256] -> L2 -> [B,T,C]",
        "late": "fuse(BiLSTM_a(audio) [B,T,256], BiLSTM_v(v_att) [B,T,256]) [B,T,fusion_dim] -> L2 -> [B,T,C]",
        "decision": "fuse(m_a [B,T,C], m_v [B,T,C]) [B,T,C] -> L2 -> [B,T,C], m_* = A / V-att model logits",
    }[position]
    return (f"{paper_name} fusion, {position} (Tian et al. Table 2: {TABLE2[method, position]}%).\n\n"
            f"    Formula in train.heads.fusion.{FUSIONS[method][0].__name__}; {shapes}.\n"
            f"    spatial [B,T,7,7].")


def _register_fusion_heads() -> None:
    """Register ``<method>-<position>`` for every Table 2 cell (late DMRN is ``dmrn``; late Concat
    is :class:`ConcatLate`)."""
    for method, (_, paper_name) in FUSIONS.items():
        for position in POSITIONS:
            if (method, position) in (("dmrn", "late"), ("concat", "late")):
                continue
            name = f"{method}-{position}"
            cls_name = "Fusion_" + name.replace("-", "_")
            cls = type(cls_name, (FusionHead,), {"method": method, "position": position,
                                                 "Config": fusion_config(method, position),
                                                 "__doc__": _fusion_docstring(method, position, paper_name),
                                                 "__module__": __name__})
            globals()[cls_name] = register_head(name)(cls)


@register_head("dmrn")
class DMRNHead(FusionHead):
    """DMRN, late fusion (Table 2: 73.1%): the reference TBMRF_Net(128, 128, 512, 29, 1).

    Tian et al. Sec. 4.3, eq. 5-6, built exactly as ``TBMRF_Net`` of ``models_fusion.py``:
    AGVA(audio [B,T,128], visual [B,T,7,7,512]) -> v_att [B,T,512];
    lstm_audio(audio), lstm_video(v_att) [B,T,256] each; DMRN block (U_a, U_v: Linear(256,256)-Tanh-
    Linear(256,256)) -> [B,T,256]; L2 = Linear(256, C) -> [B,T,C] logits (reference: their softmax).
    spatial [B,T,7,7]. 1,571,150 parameters at C = 29, as TBMRF_Net."""

    Config = ResidualFusionConfig
    method = "dmrn"
    position = "late"
    reference_protocols = {"supervised": REFERENCE_PROTOCOLS["supervised"]}  # supervised_main.py --model_name DMRN


@register_head("dmrfe")
class DMRFEHead(AvelHead):
    """DMRFE, late (Table 2: 73.3%): two residual blocks, probabilities averaged.

    Dual multimodal residual fusion ensemble, Tian et al. Sec. 6.2.

    The paper: "feeds audio and visual features into two separated blocks and then use average
    ensemble to combine the two predicted probabilities"; no reference code. Our reading: two
    residual blocks with their own U_a, U_v (eq. 5 and eq. 6 with separate parameters),
    ``h_a' = tanh(h_a + (U_a(h_a) + U_v(h_v)) / 2)`` and
    ``h_v' = tanh(h_v + (U_a'(h_a) + U_v'(h_v)) / 2)``, each classified by its own Linear(256, C);
    ``scores = log((softmax(L2_a(h_a')) + softmax(L2_v(h_v'))) / 2)`` [B,T,C] (so softmax(scores) is
    the averaged probability, what :meth:`predict` takes the argmax of). spatial
    [B,T,7,7], extras["logits_audio"] / extras["logits_video"] [B,T,C] the members' logits.

    Training: each member gets the head's loss on its own logits and the two losses are averaged
    (an ensemble of two classifiers; ``loss`` option as the other heads). A loss on the averaged
    probability instead stalls: once one member saturates on background, almost no gradient passes
    through its softmax and the averaged probability stays tied (measured: supervised on the
    synthetic AVE-sized store, 8 epochs at the majority class)."""

    Config = EnsembleConfig

    def __init__(self, num_classes: int, setting: str = "supervised", config: EnsembleConfig | None = None):
        super().__init__(num_classes, setting, config)
        cfg = self.config
        streams = 2 * cfg.hidden
        self.attention = self.make_attention()
        self.lstm_audio = BiLSTM(AUDIO_DIM, cfg.hidden)
        self.lstm_video = BiLSTM(VISUAL_DIM, cfg.hidden)
        self.block_audio = DMRN(streams, streams, streams, blocks=1)
        self.block_video = DMRN(streams, streams, streams, blocks=1)
        self.L2_audio = nn.Linear(streams, num_classes)
        self.L2_video = nn.Linear(streams, num_classes)
        nn.init.xavier_uniform_(self.L2_audio.weight)
        nn.init.xavier_uniform_(self.L2_video.weight)

    @staticmethod
    def residual_update(block: DMRN, own: torch.Tensor, h_a: torch.Tensor, h_v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(own + 0.5 * (block.U_a(h_a) + block.U_v(h_v)))

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        self.check_inputs(audio, visual)
        attended, weights = self.attend_map(audio, visual)
        h_a = self.lstm_audio(audio)
        h_v = self.lstm_video(attended)
        logits_a = self.L2_audio(self.residual_update(self.block_audio, h_a, h_a, h_v))
        logits_v = self.L2_video(self.residual_update(self.block_video, h_v, h_a, h_v))
        scores = torch.logaddexp(logits_a.log_softmax(-1), logits_v.log_softmax(-1)) - math.log(2.0)
        return HeadOutput(scores, {"logits_audio": logits_a, "logits_video": logits_v}, spatial=self.spatial_map(weights))

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        """Mean of the two members' losses, each the Tian et al. loss of its own logits."""
        member = lambda name: avel_loss(out.extras[name], batch, self.setting, weak_pool, self.config.loss)  # noqa: E731
        return 0.5 * (member("logits_audio") + member("logits_video"))


_register_fusion_heads()
