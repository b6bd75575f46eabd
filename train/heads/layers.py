"""Building blocks shared by the heads (one implementation each, used by every head).

Every layer is created once in ``__init__`` (nothing is built inside ``forward``).

* :class:`BiLSTM` — a batch-first bidirectional LSTM returning only its per-step outputs.
* :class:`MLP` — a stack of fully connected layers with an activation between (and optionally after) them.
* :class:`AudioGuidedVisualAttention` — AGVA of Tian et al. (ECCV 2018) eq. 2-4 as the authors'
  reference code (YapengTian/AVE-ECCV18) builds it, with its layer names; the Tian et al. heads,
  AVLTC's TSGA (which mixes its pre-softmax map x_t over time) use it.
* :func:`mfb_pool` — the sum-pooling + power + L2 normalisation of multi-modal factorized bilinear
  pooling (Yu et al. ICCV 2017), BMFN eq. 2.
* :func:`gated_segment_scores`, :func:`gated_predict` — the "gated" per-segment prediction rule of
  BMFN, CMRAN, CMBS and CACE-Net: an event segment (sigmoid of its is-event logit at 0.5) takes the
  video's best event class, any other segment is background (C - 1).
* :func:`valid_mask`, :func:`masked_mean`, :func:`pool_over_time`, :func:`one_hot_targets` — loss
  helpers that honour the batch's ``valid`` mask [B, T].
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu6": nn.ReLU6, "none": nn.Identity}


def activation(name: str) -> nn.Module:
    """An activation module by name: relu, tanh, sigmoid, relu6 or none."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class BiLSTM(nn.LSTM):
    """One-layer batch-first bidirectional LSTM with a zero initial state, returning only its
    per-step outputs: [B, T, input_size] -> [B, T, 2 * hidden]. (The AVEL reference's
    ``nn.LSTM(in, hidden, 1, batch_first=True, bidirectional=True)``; the parameters keep
    nn.LSTM's names.)"""

    def __init__(self, input_size: int, hidden: int):
        super().__init__(input_size, hidden, 1, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class MLP(nn.Sequential):
    """Fully connected layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with ``act`` between them,
    and after the last one too when ``act_last``. Applies to the last axis of any tensor."""

    def __init__(self, sizes: list[int], act: str = "relu", act_last: bool = False, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            last = i == len(sizes) - 2
            if not last or act_last:
                layers.append(activation(act))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class AudioGuidedVisualAttention(nn.Module):
    """Audio-guided visual attention (Tian et al. 2018, eq. 2-4), layer by layer as ``att_Net`` of
    the reference code (YapengTian/AVE-ECCV18), with its layer names:

    ``U_a = ReLU(affine_audio)``, ``U_v = ReLU(affine_video)`` (Linear to ``hidden``, applied to
    every region vector), ``W_v = affine_v``, ``W_a = affine_g`` (hidden -> regions, no bias),
    ``W_f = affine_h`` (regions -> 1, no bias);
    ``x_t = W_f tanh(W_v U_v(v_t) + (W_a U_a(a_t)) 1^T)``, ``w_t = softmax(x_t)``,
    ``v_t^att = sum_i w_t^i v_t^i`` (a weighted sum of the RAW region vectors, not of U_v).

    ``audio_term_axis``: in eq. 4 the audio term W_a U_a(a_t) 1^T is indexed by the axis that W_f
    contracts ("hidden", the paper); the reference code adds it along the region axis
    (``affine_g(a_t).unsqueeze(2)``: "region", the default).

    Shapes: audio [B, T, Da], regions [B, T, R, Dv] (a g x g map flattened row-major, as the
    reference's ``view(B*T, -1, 512)``) -> :meth:`logits` x [B, T, R];
    forward -> (attended [B, T, Dv], weights softmax(x) [B, T, R]).
    Parameters at the reference sizes (128, 512, d = 512, R = 49): 66,048 + 262,656 + 2 * 25,088 + 49.
    """

    def __init__(self, audio_dim: int = 128, visual_dim: int = 512, hidden: int = 512, regions: int = 49,
                 audio_term_axis: str = "region"):
        super().__init__()
        if audio_term_axis not in ("region", "hidden"):
            raise ValueError(f"audio_term_axis must be 'region' or 'hidden', got {audio_term_axis!r}")
        self.audio_term_axis = audio_term_axis
        self.affine_audio = nn.Linear(audio_dim, hidden)  # U_a
        self.affine_video = nn.Linear(visual_dim, hidden)  # U_v
        self.affine_v = nn.Linear(hidden, regions, bias=False)  # W_v
        self.affine_g = nn.Linear(hidden, regions, bias=False)  # W_a
        self.affine_h = nn.Linear(regions, 1, bias=False)  # W_f

    def xavier_init(self) -> None:
        """``att_Net.init_weights``: Xavier-uniform weights of every affine layer."""
        for layer in (self.affine_v, self.affine_g, self.affine_h, self.affine_audio, self.affine_video):
            nn.init.xavier_uniform_(layer.weight)

    def logits(self, audio: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """x_t of eq. 4, before the softmax of eq. 3: [B, T, R]."""
        content = self.affine_v(F.relu(self.affine_video(regions)))  # [B, T, R regions, R]
        audio_term = self.affine_g(F.relu(self.affine_audio(audio)))  # [B, T, R]
        axis = -1 if self.audio_term_axis == "region" else -2
        return self.affine_h(torch.tanh(content + audio_term.unsqueeze(axis))).squeeze(-1)

    def forward(self, audio: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.logits(audio, regions).softmax(dim=-1)
        return torch.einsum("btr,btrd->btd", weights, regions), weights


def mfb_pool(product: torch.Tensor, k: int) -> torch.Tensor:
    """MFB output stage (BMFN eq. 2 after the dropout): sum-pool groups of ``k`` consecutive
    features, signed square root, L2 normalisation. [..., d_m] -> [..., d_m / k]."""
    if product.shape[-1] % k:
        raise ValueError(f"MFB: feature size {product.shape[-1]} is not a multiple of the pool size {k}")
    pooled = product.unflatten(-1, (product.shape[-1] // k, k)).sum(-1)
    powered = torch.sign(pooled) * torch.sqrt(pooled.abs() + 1e-12)  # eps keeps the gradient finite at 0
    return F.normalize(powered, dim=-1)


def check_event_classes(event: torch.Tensor, num_classes: int) -> None:
    """The event scores of the gated rule have C - 1 (foreground) or C (background included) columns."""
    if event.shape[-1] not in (num_classes - 1, num_classes):
        raise ValueError(f"gated rule: event scores have {event.shape[-1]} classes, expected "
                         f"{num_classes - 1} (foreground) or {num_classes} (with background) for C = {num_classes}")


def gated_segment_scores(is_event: torch.Tensor, event: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-segment scores whose argmax is the gated rule of :func:`gated_predict` (with a tie at
    sigmoid(is_event) = 0.5 going to the event class, as argmax takes the first maximum).

    is_event [B, T] logits, event [B, K] logits with K = C - 1 (foreground classes only) or K = C
    (background included: weak CMRAN / CMBS) -> [B, T, C]. With s_t = sigmoid(is_event) and
    p = softmax(event): column c < K is ``log s_t + log p_c - max_c' log p_c'`` (the best class scores
    log s_t); background (C - 1) is ``log(1 - s_t)``, for K = C the larger of that and its own column."""
    check_event_classes(event, num_classes)
    log_p = F.log_softmax(event, dim=-1)
    relative = (log_p - log_p.max(dim=-1, keepdim=True).values).unsqueeze(1)  # [B,1,K], max 0
    fg = F.logsigmoid(is_event).unsqueeze(-1) + relative  # [B,T,K]
    bg = F.logsigmoid(-is_event).unsqueeze(-1)  # [B,T,1]
    background = num_classes - 1
    if event.shape[-1] == background:  # foreground classes only
        return torch.cat([fg, bg], dim=-1)
    return torch.cat([fg[..., :background], torch.maximum(bg, fg[..., background:])], dim=-1)


def gated_predict(is_event: torch.Tensor, event: torch.Tensor, num_classes: int, inclusive: bool) -> torch.Tensor:
    """The gated rule: is_event [B, T] logits, event [B, K] logits (K = C - 1 or C as in
    :func:`gated_segment_scores`) -> [B, T] long: ``argmax event`` where sigmoid(is_event) passes 0.5,
    else background C - 1 (with K = C the argmax may be background too). ``inclusive``: ``>= 0.5``
    (BMFN eq. 8), else ``> 0.5`` (the CMRAN / CMBS / CACE-Net reference code). The test is on the
    sigmoid, not on the logit's sign: a tiny negative logit whose sigmoid rounds to 0.5 passes
    ``>= 0.5``."""
    check_event_classes(event, num_classes)
    category = event.argmax(dim=-1, keepdim=True).expand_as(is_event)
    prob = torch.sigmoid(is_event)
    gate = prob >= 0.5 if inclusive else prob > 0.5
    return torch.where(gate, category, torch.full_like(category, num_classes - 1))


def valid_mask(batch: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The batch's ``valid`` [B, T] as bool, or all-true shaped like ``like``'s first two axes."""
    valid = batch.get("valid") if hasattr(batch, "get") else None
    if valid is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return valid.to(device=like.device, dtype=torch.bool)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (any shape) over the entries where ``mask`` (same shape) is true; all
    entries when ``mask`` is None; 0 when no entry is."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def pool_over_time(scores: torch.Tensor, valid: torch.Tensor | None, how: str) -> torch.Tensor:
    """MIL pooling over the valid segments: scores [B, T, C], valid [B, T] bool (None: all) ->
    [B, C]. "mean" (Tian et al. eq. 7) or "max" (the AVEL reference's ``MaxPool1d``). A row
    without any valid segment pools to 0 either way."""
    if valid is None:
        valid = torch.ones(scores.shape[:2], dtype=torch.bool, device=scores.device)
    keep = valid.unsqueeze(-1)
    if how == "mean":
        return (scores * keep).sum(1) / keep.sum(1).clamp_min(1)
    if how == "max":
        pooled = scores.masked_fill(~keep, float("-inf")).max(dim=1).values
        return torch.where(valid.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
    raise ValueError(f"weak_pool must be 'mean' or 'max', got {how!r}")


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot of class indices: [...] long -> [..., num_classes]."""
    return F.one_hot(labels.long(), num_classes).to(torch.float32)
