"""PSP and CPSP heads: positive sample propagation (Zhou, Zheng, Zhong, Hao, Wang, CVPR 2021,
"Positive Sample Propagation along the Audio-Visual Event Line") and its contrastive extension (Zhou,
Guo, Wang, TPAMI 2022, "Contrastive Positive Sample Propagation along the Audio-Visual Event Line"),
matched to the authors' code: jasongief/PSP_CVPR_2021 (``fully_model.py``, ``weakly_model.py``,
``fully_supervised_main.py``, ``weakly_supervised_main.py``, ``measure.py``, ``Optim.py``) and
jasongief/CPSP, folder ``cpsp_avel`` (``model/psp_family.py``, ``losses.py``, ``fully_supv_main.py``,
``weakly_supv_main.py``, ``run_fully_supv.sh``, ``run_weakly_supv.sh``).

Inputs and outputs (T segments, any T >= 2; C = event classes + background, AVE: 29, background last)::

    audio  [B, T, 128]        VGGish per segment
    visual [B, T, 7, 7, 512]  VGG-19 pool5 per segment (the 49 regions in row-major order)
    -> HeadOutput.scores [B, T, C], extras (per head, see the classes)

Layers (reference names kept, so the parity test's state-dict key map only strips ``lstm_a_v.``
and the ``.0`` of one-layer Sequentials)
-----------------------------------------------------------------------------------------------
* ``fa``: ``Linear(128, 256, bias=False)`` then ``Linear(256, 128, bias=False)``, no activation
  between (fully_model.py:209-212); ``fv`` the same from 512 (213-216). Default PyTorch init.
* ``attention``: AVGA = Tian et al.'s AGVA (fully_model.py:43-79), i.e.
  :class:`train.heads.layers.AudioGuidedVisualAttention` with the reference's layer names and the
  audio term added along the region axis (``affine_g(a_t).unsqueeze(2)``), hidden 512, 49 regions,
  Xavier-uniform weights of its five affine layers (``xavier_init``, fully_model.py:56-60; biases
  keep the default init). PSP's supervised model and CPSP feed it ``fa(audio)``; PSP's weak model
  the raw audio (weakly_model.py:217-218). The attended vector is the weighted sum of the raw
  pool5 region vectors.
* after the attention: ``fv`` (PSP supervised, CPSP) or ``linear_v = Linear(512, 128)`` with bias
  (PSP weak, weakly_model.py:193, 219).
* ``lstm_audio``, ``lstm_video``: one-layer BiLSTMs, hidden 128, zero initial state
  (``LSTM_A_V``, fully_model.py:82-104) -> [B, T, 256] each.
* ``psp``: :class:`PositiveSamplePropagation` (fully_model.py:107-171):
  ``v_L1, v_L2, a_L1, a_L2`` = ``Linear(256, 256, bias=False)`` + ReLU + dropout 0.1;
  beta_va = ReLU(v_L2(v) a_L1(a)^T / sqrt(256)) [B, T, T], beta_av = beta_va^T; each row
  L1-normalised (+1e-8), entries <= thr_val set to 0 (the pruning), and, in the FULL variant,
  renormalised; v <- v + gamma_va a_L2(a), a <- a + gamma_av v_L1(v). The full variant (PSP
  supervised and both CPSP models) then applies ``v_fc``/``a_fc`` = ``Linear(256, 256, bias=False)``
  + ReLU + dropout; both variants end in ONE shared ``layer_norm`` (LayerNorm(256, eps 1e-6)) per
  stream and fuse ``(v + a) / 2``. The weak PSP variant (weakly_model.py:71-117) has neither the
  renormalisation nor ``v_fc``/``a_fc``. Xavier-uniform weights (fully_model.py:124-129).
* AV similarity (``AVSimilarity``): cosine of the two final streams per segment [B, T].

PSP (``psp``)
-------------
Supervised (``psp_net`` of fully_model.py:203-253): ``scores = L2(ReLU(L1(fusion)))`` with
``L1 = Linear(256, 64, bias=False)``, ``L2 = Linear(64, C, bias=False)`` (Xavier). Loss
(fully_supervised_main.py:85-87): cross-entropy of the segment logits + ``LAMBDA`` (100) x AVPS loss
(measure.py:32-41, paper eq. 8-9): ``MSE(ReLU(s) / (sum_t ReLU(s) + 1e-8), target)`` with s the AV
similarity and target 1/n on the n segments of the video's event class (dataloader.py:52-69: the
lowest class index with a segment, so a background-only video has 1/T everywhere). Prediction:
argmax of the scores (measure.py:8-28), background = C-1 (the reference's 28).
Weak (``psp_net`` of weakly_model.py:184-233): ``score = L2(ReLU(L1(fusion)))``, then a temporal
weight ``w = sigmoid(ReLU(W3(score)))`` with ``W3 = Linear(C, 1, bias=False)`` (default init) and
``scores = score * w``; video prediction = softmax of the time-average of ``scores`` (AvgPool1d).
Loss (weakly_supervised_main.py:93-96): ``BCELoss(video prediction, prob_labels)``; ``prob_label.h5``
holds, per the author (issue jasongief/PSP_CVPR_2021#7), the proportion of the video's segments of
each class, background included (``weak_target="proportions"``, built from ``batch["labels"]``: this
target needs segment counts, i.e. more than a video-level tag); ``weak_target="video"`` uses the
one-hot video label instead (``mil_labels.h5``). Prediction: argmax of the weighted per-segment
``scores`` (weakly_supervised_main.py:176-179).

CPSP (``cpsp``)
---------------
The architecture differs from PSP's heads, so cpsp follows ``psp_family.py``: BOTH settings use the
full-variant backbone above (``fully_psp_net`` / ``weakly_psp_net``, psp_family.py:211-363, both
with ``fa``/``fv`` and the full PSP) and a CMRAN-style classifier:
``is_event_scores = event_classifier(fusion)`` (``Linear(256, 1)``) [B, T] and
``event_scores = category_classifier(mean_t fusion)`` (``Linear(256, C-1)``; the run scripts pass
``--category_num 28``) [B, C-1]; default init. Prediction (``compute_accuracy_supervised`` of both
scripts): ``sigmoid(is_event) > 0.5`` -> argmax of ``event_scores``, else background (C-1).
``scores`` [B, T, C] = [logsigmoid(s) + log_softmax(c) - max log_softmax(c), logsigmoid(-s)], whose
argmax is that rule (up to ties at s = 0).
Supervised loss (fully_supv_main.py:245-269 with run_fully_supv.sh's flags): BCE-with-logits(
is_event) + CE(event_scores, the video's class) + 100 x AVPS (target ``is_event / (n + 1e-6)``)
+ 0.01 x segment-level contrastive loss L_spsa (losses.py:22-45, temperature 0.6) + 1 x video-level
contrastive loss L_vpsa (losses.py:48-78, margin 0.2, 3 negatives: the script calls it without
``margin``/``neg_num``, so the function defaults apply).
Weak loss (weakly_supv_main.py:229-235 with run_weakly_supv.sh's flags): ``MultiLabelSoftMarginLoss(
softmax(max_t sigmoid(s_t) c), one-hot foreground video label)`` (a sigmoid BCE on softmax
probabilities, as Tian et al.'s reference) + 1 x L_vpsa with margin 0.6 and 4 negatives.

L_spsa as published is a constant: ``segment_contrastive_loss`` sums its masks over the ANCHOR axis
(``dim=1``), so every event column has no negative (ratio 1, loss ~0) and every background column
no positive (ratio 0, loss -log 1e-12 = 27.63); the value is 27.63 x mean(n_bg / n_event) and its
gradient is ~1e-15 (tests/test_psp_parity.py shows both). ``scon_form="reference"`` (default)
reproduces it; ``scon_form="anchor"`` is the loss the masks describe: for each event segment i,
``-log(P_i / (P_i + N_i))`` with P_i = sum over event segments j of exp(cos_ij / t) and N_i the
MEAN over background segments k of exp(cos_ik / t), averaged over event segments, then over videos
with an event.
L_vpsa: time-average of the L2-normalised fusion per video, Euclidean distances in the batch, the
farthest same-class video (itself included) as positive, the mean of the ``neg_num`` nearest
other-class videos as negative, ``MarginRankingLoss``: mean over videos of max(0, d_ap - d_an + m).

Differences from the reference code (and why)
---------------------------------------------
* Padded segments (``valid`` False) are left out of every loss term (CE/BCE means, AVPS
  normalisation and MSE, MIL pooling, time-averages of the losses, L_spsa counts); ``forward`` has
  no mask, so PSP's T x T propagation and CPSP's mean over time in ``forward`` see all T segments,
  as the reference (AVE has no padding).
* The AVPS target is computed per batch; the PSP reference fills a persistent buffer
  (``segment_avps_gt_batch``) without clearing it, so entries of earlier batches leak into later
  targets (dataloader.py:50, 65). We use the intended target.
* The video class of a background-only video is C-1 here (its own class in L_vpsa); the CPSP
  scripts take it from an argmax over the foreground columns, i.e. class 0, and CPSP's supervised
  CE then trains ``event_scores`` towards class 0: we leave such videos out of that CE (the
  weak MultiLabelSoftMargin target of such a video is all zeros in both). AVE has no such
  training videos (every AVE video contains an event), so none of this changes AVE training.
* L_vpsa with fewer than ``neg_num`` other-class videos in the batch averages the ones there are
  (an anchor without any contributes 0); the reference averages in 1e12 placeholders (so the term
  is 0) or fails in ``topk`` when the batch is smaller than ``neg_num``. Identical otherwise.
* The CPSP scripts train and evaluate in float64 (``model.double()``), the PSP code builds sqrt(d)
  as a float32 CUDA tensor; here dtype and device follow the inputs.
* The PSP scripts drop the last partial batch (``len // batch_size`` batches per epoch); the avel
  loop keeps it. They also keep the epoch of the best TEST accuracy (fully_supervised_main.py:118-125),
  CPSP the best validation accuracy.
* Published-script caveats: run_fully_supv.sh has a space after the line-continuing backslash of
  ``--model`` (line 25), so as written the command ends there and the flags below it never reach
  the script; weakly_supv_main.py imports ``loss_vpsa_infoNCE_version``, which losses.py does not
  define; run_weakly_supv.sh passes no ``--vis_fea_type`` (default_config.yaml: resnet). The values
  used here are the flags the scripts list, with the VGG features.

Reference training protocol of psp (``train.protocol: reference``, :data:`PSP_REFERENCE_PROTOCOLS`)
---------------------------------------------------------------------------------------------------
fully_supervised_main.py: ``net_model.train()`` every epoch (line 63), a new permutation of the
training list at the first batch of every epoch (``random.shuffle``, dataloader.py:76-79),
``len // 128`` batches (the last partial batch dropped, line 56), ``zero_grad``, CE + 100 x AVPS,
``backward``, ``step`` (lines 81-94), the lr x 0.8 after the epoch (lines 98-99); after 0-based
epochs 5, 10, ... (``epoch % 5 == 0 and epoch != 0``) val and then test are evaluated in eval mode
(lines 110-125) and the model with the best TEST accuracy is saved, replaced on ties (``>=``).
weakly_supervised_main.py: the same loop, cadence and selection (lines 71-126).
tests/test_training_parity.py trains the reference transcription and avel side by side.

Schedules (``train_defaults`` / ``weak_train_defaults``)
--------------------------------------------------------
* PSP supervised: Adam lr 1e-3 (fully_supervised_main.py:190), batch 128 (:36), 300 epochs (:35),
  lr x 0.8 after epochs 60 and 120 (``if (epoch+1) % 60 == 0 and epoch < 170: update_lr()``, :98-99,
  Optim.py:23 -> ``milestones=(60, 120)``, ``lr_gamma=0.8``), no weight decay, no clipping.
* PSP weak: the same with ``(epoch+1) % 80 == 0 and epoch < 200`` (weakly_supervised_main.py:105-106)
  -> ``milestones=(80, 160)``; the weak script also trains on the 178 background-only videos
  (``*_noisy.h5``), which the avel data decides about, not the head.
* CPSP (both): Adam lr 1e-3 (run_*.sh ``--lr 0.001``; fully_supv_main.py:160 passes no weight
  decay, so default_config.yaml's 5e-4 is unused), batch 64, 45 epochs, ``clip_grad_norm_`` 0.1
  (run_*.sh ``--clip_gradient 0.1``); MultiStepLR gamma 0.5 stepped per epoch at (10, 20, 30)
  supervised (fully_supv_main.py:161) and (5, 20, 40) weak (weakly_supv_main.py:159).
* thr_val: 0.099 supervised, 0.095 weak (both repos' READMEs / run scripts / argparse defaults).

Parameter counts at the defaults with C = 29 (reference registered / ours = those the loss reaches):
PSP supervised 1,667,251 / 1,548,657 (the reference also registers ``linear_v``, ``v_classify``,
``a_classify``, ``L3``, ``L4``); PSP weak 1,254,251 / 1,253,902 (``temperature``, ``W1``, ``W2``
unused); CPSP supervised and weak 1,658,062 / 1,537,870 (``linear_v``, ``v_classify``,
``a_classify``, ``L1``, ``L2`` unused). Checked in tests/test_psp_parity.py.

Reported AVE accuracy: PSP 77.8 supervised / 73.5 weak (as quoted in the AVLTC and BMFN papers'
tables). The CPSP README gives no AVE accuracy.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..protocol import Protocol
from ..registry import register_head
from .base import Head, HeadOutput
from .layers import AudioGuidedVisualAttention, BiLSTM, masked_mean, pool_over_time, valid_mask

AUDIO_DIM = 128
VISUAL_DIM = 512
GRID = 7  # the reference's map_size = 49 regions

#: fully_supervised_main.py: Adam 1e-3, batch 128, 300 epochs, lr x 0.8 after epochs 60 and 120
PSP_SUPERVISED_SCHEDULE = {"lr": 1e-3, "batch_size": 128, "epochs": 300, "lr_step": None, "milestones": (60, 120),
                           "lr_gamma": 0.8, "weight_decay": 0.0, "grad_clip": None}
#: weakly_supervised_main.py: the same, lr x 0.8 after epochs 80 and 160
PSP_WEAK_SCHEDULE = {**PSP_SUPERVISED_SCHEDULE, "milestones": (80, 160)}
#: ``train.protocol: reference`` for psp: fully_supervised_main.py / weakly_supervised_main.py (module docstring)
_PSP_NOTES = ("the script reshuffles its sample list with Python's random.shuffle at the first batch of every epoch "
              "(dataloader.py:76-79); avel draws each epoch's permutation from the run's torch generator",
              "the script also evaluates val at the same epochs and prints its best val accuracy; the model it saves "
              "is the one with the best test accuracy (the latest on ties)")
PSP_REFERENCE_PROTOCOLS = {
    "supervised": Protocol(
        "reference", script="jasongief/PSP_CVPR_2021 fully_supervised_main.py", shuffle=True, drop_last=True,
        select_on="test", eval_first=6, eval_every=5, eval_last=False, keep="better_or_equal",
        notes=_PSP_NOTES + ("the AVPS target is computed per batch; the script's buffer keeps entries of earlier "
                            "batches (dataloader.py:50, 65; see the module docstring)",)),
    "weak": Protocol(
        "reference", script="jasongief/PSP_CVPR_2021 weakly_supervised_main.py", shuffle=True, drop_last=True,
        select_on="test", eval_first=6, eval_every=5, eval_last=False, keep="better_or_equal", notes=_PSP_NOTES),
}
#: run_fully_supv.sh + fully_supv_main.py: Adam 1e-3, batch 64, 45 epochs, MultiStepLR(10, 20, 30; 0.5), clip 0.1
CPSP_SUPERVISED_SCHEDULE = {"lr": 1e-3, "batch_size": 64, "epochs": 45, "lr_step": None, "milestones": (10, 20, 30),
                            "lr_gamma": 0.5, "weight_decay": 0.0, "grad_clip": 0.1}
#: run_weakly_supv.sh + weakly_supv_main.py: the same with MultiStepLR(5, 20, 40; 0.5)
CPSP_WEAK_SCHEDULE = {**CPSP_SUPERVISED_SCHEDULE, "milestones": (5, 20, 40)}


# ----------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class PSPModelOptions:
    """Backbone options shared by psp and cpsp (defaults: ``psp_net(128, 512, 128, 29)``)."""

    #: AVGA hidden size (``AVGA.hidden_size``)
    att_dim: int = 512
    #: width of the first layer of ``fa`` / ``fv`` (reference 256)
    proj_hidden: int = 256
    #: output width of ``fa`` / ``fv`` / ``linear_v``: the BiLSTM inputs (reference 128)
    proj_dim: int = 128
    #: BiLSTM hidden size per direction (``hidden_dim``); PSP works on 2 x hidden
    hidden: int = 128
    #: output width of PSP's ``v_fc`` / ``a_fc`` = the fused feature (full variant; ``out_dim``)
    fusion_dim: int = 256
    #: PSP pruning threshold thr_val of the supervised / weak model
    threshold_supervised: float = 0.099
    threshold_weak: float = 0.095
    #: dropout inside PSP
    dropout: float = 0.1


@dataclasses.dataclass
class PSPConfig(PSPModelOptions):
    """Options of the ``psp`` head."""

    #: width of the classifier's hidden layer L1 (reference 64)
    classifier_hidden: int = 64
    #: weight of the AVPS loss (``--LAMBDA``)
    lambda_avps: float = 100.0
    #: weak target: "proportions" (prob_label.h5: share of the video's segments per class, background
    #: included) or "video" (one-hot video label, mil_labels.h5)
    weak_target: Literal["proportions", "video"] = "proportions"


@dataclasses.dataclass
class CPSPConfig(PSPModelOptions):
    """Options of the ``cpsp`` head (loss weights of run_fully_supv.sh / run_weakly_supv.sh)."""

    #: weight of the AVPS loss (supervised; ``--lambda_avps``)
    lambda_avps: float = 100.0
    #: weight of the segment-level contrastive loss L_spsa (supervised; ``--lambda_scon``)
    lambda_scon: float = 0.01
    #: weight of the video-level contrastive loss L_vpsa (``--lambda_vcon``)
    lambda_vcon: float = 1.0
    #: L_spsa temperature (losses.py default t = 0.6)
    scon_temperature: float = 0.6
    #: "reference": losses.py as published (a constant, see the module doc); "anchor": per event segment
    scon_form: Literal["reference", "anchor"] = "reference"
    #: L_vpsa margin and number of nearest negatives, supervised (losses.py defaults) and weak (run script)
    margin_supervised: float = 0.2
    margin_weak: float = 0.6
    negatives_supervised: int = 3
    negatives_weak: int = 4


# ----------------------------------------------------------------------------------------------
# layers


class PositiveSamplePropagation(nn.Module):
    """PSP (paper eq. 1-7), ``PSP`` of fully_model.py (``full=True``) or of weakly_model.py.

    forward(a [B,T,d], v [B,T,d], thr) -> (fusion [B,T,out], v_psp [B,T,out], a_psp [B,T,out]) with
    out = ``out_dim`` (full) or d (weak)."""

    def __init__(self, dim: int, out_dim: int, dropout: float, full: bool):
        super().__init__()
        self.full = full
        self.v_L1 = nn.Linear(dim, dim, bias=False)
        self.v_L2 = nn.Linear(dim, dim, bias=False)
        self.a_L1 = nn.Linear(dim, dim, bias=False)
        self.a_L2 = nn.Linear(dim, dim, bias=False)
        layers = [self.v_L1, self.v_L2, self.a_L1, self.a_L2]
        if full:
            self.v_fc = nn.Linear(dim, out_dim, bias=False)
            self.a_fc = nn.Linear(dim, out_dim, bias=False)
            layers += [self.a_fc, self.v_fc]
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim if full else dim, eps=1e-6)
        for layer in layers:
            nn.init.xavier_uniform_(layer.weight)

    def branch(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(layer(x)))

    def prune(self, beta: torch.Tensor, thr: float) -> torch.Tensor:
        """Row-wise L1 normalisation, entries <= thr removed, (full) renormalised: gamma [B,T,T]."""
        beta = beta / (beta.sum(dim=-1, keepdim=True) + 1e-8)
        gamma = (beta > thr).to(beta.dtype) * beta
        if self.full:
            gamma = gamma / (gamma.sum(dim=-1, keepdim=True) + 1e-8)
        return gamma

    def forward(self, a: torch.Tensor, v: torch.Tensor, thr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v1, v2 = self.branch(self.v_L1, v), self.branch(self.v_L2, v)
        a1, a2 = self.branch(self.a_L1, a), self.branch(self.a_L2, a)
        beta_va = F.relu(v2 @ a1.transpose(1, 2) / math.sqrt(v2.shape[-1]))  # rows: visual segments
        gamma_va = self.prune(beta_va, thr)
        gamma_av = self.prune(beta_va.transpose(1, 2), thr)
        v_psp = v + gamma_va @ a2
        a_psp = a + gamma_av @ v1
        if self.full:
            v_psp = self.dropout(F.relu(self.v_fc(v_psp)))
            a_psp = self.dropout(F.relu(self.a_fc(a_psp)))
        v_psp, a_psp = self.layer_norm(v_psp), self.layer_norm(a_psp)
        return 0.5 * (v_psp + a_psp), v_psp, a_psp


# ----------------------------------------------------------------------------------------------
# losses


def av_similarity(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``AVSimilarity``: cosine of the two streams per segment, [B,T,D] x 2 -> [B,T]."""
    return (F.normalize(v, dim=-1) * F.normalize(a, dim=-1)).sum(dim=-1)


def avps_loss(similarity: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """AVPS loss (measure.py / losses.py ``AVPSLoss``): MSE between ReLU(similarity) normalised over the
    video's valid segments and ``target`` [B,T], averaged over valid segments."""
    relu = F.relu(similarity) * valid
    normalised = relu / (relu.sum(dim=-1, keepdim=True) + 1e-8)
    return masked_mean((normalised - target) ** 2, valid)


def psp_avps_target(labels: torch.Tensor, valid: torch.Tensor, num_classes: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PSP's target (dataloader.py ``get_segment_wise_relation``): 1/n on the n segments of the lowest
    class index the video has (its event; background for a background-only video), else 0."""
    first = labels.masked_fill(~valid, num_classes).min(dim=1, keepdim=True).values
    hits = ((labels == first) & valid).to(dtype)
    return hits / hits.sum(dim=1, keepdim=True).clamp_min(1)


def segment_contrastive_loss(fusion: torch.Tensor, is_event: torch.Tensor, valid: torch.Tensor,
                             temperature: float, form: str) -> torch.Tensor:
    """L_spsa (losses.py ``segment_contrastive_loss``), fusion [B,T,D], is_event / valid [B,T] bool.
    ``form`` "reference" sums the masks over the anchor axis as published, "anchor" per event segment."""
    event = (is_event & valid).to(fusion.dtype)
    background = (~is_event & valid).to(fusion.dtype)
    unit = F.normalize(fusion, dim=-1)
    sim = torch.exp(unit @ unit.transpose(1, 2) / temperature)  # [B, i, j]
    positive = event[:, :, None] * event[:, None, :]
    negative = event[:, :, None] * background[:, None, :]  # anchor i event, j background
    n_event, n_background = event.sum(dim=1), background.sum(dim=1)
    has_event = (n_event > 0).to(fusion.dtype)
    if form == "reference":
        # the reference's "+ 1e-12" on the counts is added to integer tensors (float32 result), where it
        # vanishes: it divides by the counts themselves
        pos = (sim * positive).sum(dim=1)  # [B, j]
        neg = (sim * negative).sum(dim=1) / n_background[:, None].clamp_min(1)
        ratio = pos / (pos + neg + 1e-12)
        per_video = (-torch.log(ratio + 1e-12) * valid).sum(dim=1) / n_event.clamp_min(1)
    elif form == "anchor":
        pos = (sim * positive).sum(dim=2)  # [B, i]: >= exp(1 / t) for an event anchor (j = i)
        neg = (sim * negative).sum(dim=2) / n_background[:, None].clamp_min(1)
        per_anchor = -torch.log(pos.clamp_min(1e-30) / (pos + neg).clamp_min(1e-30))
        per_video = (per_anchor * event).sum(dim=1) / n_event.clamp_min(1)
    else:
        raise ValueError(f"scon_form must be 'reference' or 'anchor', got {form!r}")
    return (per_video * has_event).sum() / has_event.sum().clamp_min(1)


def video_contrastive_loss(fusion: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor, margin: float,
                           neg_num: int) -> torch.Tensor:
    """L_vpsa (losses.py ``video_contrastive_loss``): fusion [B,T,D], classes [B]; hardest positive vs
    the mean of the ``neg_num`` nearest negatives, margin ranking loss averaged over the batch."""
    video = pool_over_time(F.normalize(fusion, dim=-1), valid, "mean")  # [B, D]
    sq = video.pow(2).sum(dim=1, keepdim=True)
    dist = (sq + sq.t() - 2.0 * video @ video.t()).clamp_min(1e-12).sqrt()
    same = classes[:, None] == classes[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    k = min(neg_num, dist.shape[0])
    nearest = dist.masked_fill(same, float("inf")).topk(k, dim=1, largest=False).values
    found = torch.isfinite(nearest)
    d_an = torch.where(found, nearest, torch.zeros_like(nearest)).sum(dim=1) / found.sum(dim=1).clamp_min(1)
    hinge = F.relu(d_ap - d_an + margin) * found.any(dim=1)
    return hinge.mean()


def gated_scores(is_event: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
    """[B,T,C] scores whose argmax is the CPSP rule: background (last) unless sigmoid(s_t) > 0.5, then
    the argmax of the video's category logits. is_event [B,T], category [B,C-1]."""
    log_p = F.log_softmax(category, dim=-1)
    foreground = F.logsigmoid(is_event)[..., None] + (log_p - log_p.max(dim=-1, keepdim=True).values)[:, None, :]
    return torch.cat([foreground, F.logsigmoid(-is_event)[..., None]], dim=-1)


# ----------------------------------------------------------------------------------------------
# heads


class PSPFamilyHead(Head):
    """The backbone of both heads: AVGA, fa/fv (or linear_v), BiLSTMs, PSP. ``full`` selects the
    full-variant backbone (fully_model.py / psp_family.py) or PSP's weak one (weakly_model.py)."""

    def build_backbone(self, full: bool) -> int:
        """Create the layers; returns the width of the fused feature."""
        cfg = self.config
        self.full_backbone = full
        if full:
            self.fa = nn.Sequential(nn.Linear(AUDIO_DIM, cfg.proj_hidden, bias=False),
                                    nn.Linear(cfg.proj_hidden, cfg.proj_dim, bias=False))
            self.fv = nn.Sequential(nn.Linear(VISUAL_DIM, cfg.proj_hidden, bias=False),
                                    nn.Linear(cfg.proj_hidden, cfg.proj_dim, bias=False))
        else:
            self.linear_v = nn.Linear(VISUAL_DIM, cfg.proj_dim)
        attention_audio = cfg.proj_dim if full else AUDIO_DIM
        self.attention = AudioGuidedVisualAttention(attention_audio, VISUAL_DIM, cfg.att_dim, GRID * GRID, "region")
        self.attention.xavier_init()
        self.lstm_audio = BiLSTM(attention_audio, cfg.hidden)
        self.lstm_video = BiLSTM(cfg.proj_dim, cfg.hidden)
        self.psp = PositiveSamplePropagation(2 * cfg.hidden, cfg.fusion_dim, cfg.dropout, full)
        return cfg.fusion_dim if full else 2 * cfg.hidden

    @property
    def threshold(self) -> float:
        return self.config.threshold_weak if self.setting == "weak" else self.config.threshold_supervised

    def check_inputs(self, audio: torch.Tensor, visual: torch.Tensor) -> None:
        if audio.dim() != 3 or audio.shape[-1] != AUDIO_DIM:
            raise ValueError(f"head {self.name!r}: audio must be [B, T, {AUDIO_DIM}], got {list(audio.shape)}")
        if visual.shape[:2] != audio.shape[:2] or tuple(visual.shape[2:]) != (GRID, GRID, VISUAL_DIM):
            raise ValueError(f"head {self.name!r}: visual must be [B, T, {GRID}, {GRID}, {VISUAL_DIM}] with the "
                             f"audio's B, T = {list(audio.shape[:2])}, got {list(visual.shape)}")

    def encode(self, audio: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """fusion [B,T,D], the final streams v_psp / a_psp, the attention map [B,T,7,7]."""
        self.check_inputs(audio, visual)
        if self.full_backbone:
            audio = self.fa(audio)
        attended, weights = self.attention(audio, visual.flatten(2, 3))
        video = self.fv(attended) if self.full_backbone else self.linear_v(attended)
        fusion, v_psp, a_psp = self.psp(self.lstm_audio(audio), self.lstm_video(video), self.threshold)
        return {"fusion": fusion, "v_psp": v_psp, "a_psp": a_psp,
                "attention": weights.reshape(*weights.shape[:2], GRID, GRID)}


@register_head("psp")
class PSPHead(PSPFamilyHead):
    """PSP (Zhou et al., CVPR 2021; jasongief/PSP_CVPR_2021): positive sample propagation.

    AVGA + BiLSTMs + positive sample propagation + ``L2(ReLU(L1(fusion)))``; the weak model adds a
    temporal weight (AVE: 77.8 % supervised, 73.5 % weak). See the module doc.

    forward(audio [B,T,128], visual [B,T,7,7,512]) -> HeadOutput(scores [B,T,C]: the segment logits
    (supervised) or the temporally weighted segment scores (weak); argmax = the reference's prediction;
    spatial [B,T,7,7] (AVGA's weights); extras: ``fusion`` [B,T,D]; supervised: ``av_similarity`` [B,T] (the AVPS
    loss's input); weak: ``temporal_weight`` [B,T] (sigmoid(ReLU(W3 score)))).

    Parameters at the defaults with C = 29: supervised 1,548,657 (reference ``psp_net`` registers
    1,667,251), weak 1,253,902 (reference 1,254,251)."""

    Config: ClassVar[type] = PSPConfig
    train_defaults: ClassVar[dict[str, Any]] = PSP_SUPERVISED_SCHEDULE
    weak_train_defaults: ClassVar[dict[str, Any]] = PSP_WEAK_SCHEDULE
    reference_protocols: ClassVar[dict[str, Protocol]] = PSP_REFERENCE_PROTOCOLS

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        width = self.build_backbone(full=setting == "supervised")
        self.L1 = nn.Linear(width, self.config.classifier_hidden, bias=False)
        self.L2 = nn.Linear(self.config.classifier_hidden, num_classes, bias=False)
        nn.init.xavier_uniform_(self.L1.weight)
        nn.init.xavier_uniform_(self.L2.weight)
        if setting == "weak":
            self.W3 = nn.Linear(num_classes, 1, bias=False)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        enc = self.encode(audio, visual)
        score = self.L2(F.relu(self.L1(enc["fusion"])))
        extras = {"fusion": enc["fusion"]}
        if self.setting == "weak":
            weight = torch.sigmoid(F.relu(self.W3(score)))  # [B,T,1]
            extras["temporal_weight"] = weight.squeeze(-1)
            return HeadOutput(score * weight, extras, spatial=enc["attention"])
        extras["av_similarity"] = av_similarity(enc["v_psp"], enc["a_psp"])
        return HeadOutput(score, extras, spatial=enc["attention"])

    def weak_pooling(self, requested: str) -> str:
        """The weak model averages the weighted scores over time (AvgPool1d); ``train.weak_pool`` is ignored."""
        return "mean"

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor],
             weak_pool: str = "mean") -> dict[str, torch.Tensor]:
        """Supervised: CE + lambda_avps x AVPS. Weak: BCE(softmax(mean_t scores), target)."""
        scores = out.scores
        valid = valid_mask(batch, scores)
        labels = batch["labels"].to(scores.device).masked_fill(~valid, 0)
        if self.setting == "weak":
            video = pool_over_time(scores, valid, "mean").softmax(dim=-1)
            if self.config.weak_target == "proportions":
                counts = F.one_hot(labels, self.num_classes).to(scores.dtype) * valid[..., None]
                target = counts.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)
            else:
                target = F.one_hot(batch["video_label"].to(scores.device), self.num_classes).to(scores.dtype)
            has_segment = valid.any(dim=1, keepdim=True).expand_as(video)
            bce = masked_mean(F.binary_cross_entropy(video, target, reduction="none"), has_segment)
            return {"loss": bce, "bce": bce.detach()}
        ce = masked_mean(F.cross_entropy(scores.transpose(1, 2), labels, reduction="none"), valid)
        target = psp_avps_target(labels, valid, self.num_classes, scores.dtype)
        avps = avps_loss(out.extras["av_similarity"], target, valid)
        return {"loss": ce + self.config.lambda_avps * avps, "ce": ce.detach(), "avps": avps.detach()}


@register_head("cpsp")
class CPSPHead(PSPFamilyHead):
    """CPSP (Zhou et al., TPAMI 2022; jasongief/CPSP): contrastive positive sample propagation.

    The full PSP backbone + an is-event classifier per segment and a
    category classifier on the time-averaged fusion, trained with PSP's AVPS loss and the segment- /
    video-level contrastive losses (L_spsa, L_vpsa). See the module doc.

    forward(audio [B,T,128], visual [B,T,7,7,512]) -> HeadOutput(scores [B,T,C] (:func:`gated_scores`),
    extras: ``is_event_scores`` [B,T] (logits), ``event_scores`` [B,C-1] (logits), ``av_similarity``
    [B,T], ``fusion`` [B,T,fusion_dim]; spatial [B,T,7,7] (AVGA's weights)).

    Parameters at the defaults with C = 29: 1,537,870 in both settings (reference ``fully_psp_net`` /
    ``weakly_psp_net`` with category_num 28 register 1,658,062)."""

    Config: ClassVar[type] = CPSPConfig
    train_defaults: ClassVar[dict[str, Any]] = CPSP_SUPERVISED_SCHEDULE
    weak_train_defaults: ClassVar[dict[str, Any]] = CPSP_WEAK_SCHEDULE

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        width = self.build_backbone(full=True)
        self.event_classifier = nn.Linear(width, 1)
        self.category_classifier = nn.Linear(width, num_classes - 1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        enc = self.encode(audio, visual)
        fusion = enc["fusion"]
        is_event = self.event_classifier(fusion).squeeze(-1)
        category = self.category_classifier(fusion.mean(dim=1))
        extras = {"is_event_scores": is_event, "event_scores": category, "fusion": fusion,
                  "av_similarity": av_similarity(enc["v_psp"], enc["a_psp"])}
        return HeadOutput(gated_scores(is_event, category), extras, spatial=enc["attention"])

    def predict(self, out: HeadOutput) -> torch.Tensor:
        """``compute_accuracy_supervised``: sigmoid(is_event) > 0.5 -> argmax event_scores, else C-1."""
        is_event, category = out.extras["is_event_scores"], out.extras["event_scores"]
        chosen = category.argmax(dim=-1, keepdim=True).expand_as(is_event)
        return torch.where(torch.sigmoid(is_event) > 0.5, chosen, torch.full_like(chosen, self.num_classes - 1))

    def weak_pooling(self, requested: str) -> str:
        """The weak model max-pools the gated logits over time; ``train.weak_pool`` is ignored."""
        return "max"

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor],
             weak_pool: str = "mean") -> dict[str, torch.Tensor]:
        cfg = self.config
        s, c, fusion = out.extras["is_event_scores"], out.extras["event_scores"], out.extras["fusion"]
        valid = valid_mask(batch, s)
        background = self.num_classes - 1
        video_label = batch["video_label"].to(s.device)
        if self.setting == "weak":
            gated = torch.sigmoid(s)[..., None] * c[:, None, :]  # [B,T,C-1]
            video = pool_over_time(gated, valid, "max").softmax(dim=-1)
            target = F.one_hot(video_label, self.num_classes)[:, :background].to(video.dtype)
            mil = F.binary_cross_entropy_with_logits(video, target)  # MultiLabelSoftMarginLoss
            vcon = video_contrastive_loss(fusion, video_label, valid, cfg.margin_weak, cfg.negatives_weak)
            return {"loss": mil + cfg.lambda_vcon * vcon, "mil": mil.detach(), "vcon": vcon.detach()}
        is_event = (batch["labels"].to(s.device) != background) & valid
        bce = masked_mean(F.binary_cross_entropy_with_logits(s, is_event.to(s.dtype), reduction="none"), valid)
        has_event = video_label != background
        ce = masked_mean(F.cross_entropy(c, video_label.clamp_max(background - 1), reduction="none"), has_event)
        events = is_event.to(s.dtype)
        avps = avps_loss(out.extras["av_similarity"], events / (events.sum(dim=1, keepdim=True) + 1e-6), valid)
        scon = segment_contrastive_loss(fusion, is_event, valid, cfg.scon_temperature, cfg.scon_form)
        vcon = video_contrastive_loss(fusion, video_label, valid, cfg.margin_supervised, cfg.negatives_supervised)
        total = bce + ce + cfg.lambda_avps * avps + cfg.lambda_scon * scon + cfg.lambda_vcon * vcon
        return {"loss": total, "is_event": bce.detach(), "event_class": ce.detach(), "avps": avps.detach(),
                "scon": scon.detach(), "vcon": vcon.detach()}
