"""Building blocks shared by the co-attention, BMFN and AVLTC heads.

Every layer is created once in ``__init__`` (nothing is built inside ``forward``).

* :class:`BiLSTM` — a batch-first bidirectional LSTM returning only its per-step outputs.
* :class:`MLP` — a stack of fully connected layers with an activation between (and optionally after) them.
* :class:`AudioGuidedVisualAttention` — AGVA of Tian et al. (ECCV 2018) eq. 2-4, with the sizes of the
  authors' reference code (YapengTian/AVE-ECCV18: d = 512; W_v, W_a, W_f without bias).
  AVLTC's TSGA builds on it. ``train.heads.avel.AGVA`` computes the same function with the reference
  code's layer names (tests/test_heads_avltc.py checks the two agree); this one also exposes the
  pre-softmax map x_t that TSGA mixes over time.
* :func:`mfb_pool` — the sum-pooling + power + L2 normalisation of multi-modal factorized bilinear
  pooling (Yu et al. ICCV 2017), BMFN eq. 2.
* :func:`masked_mean`, :func:`masked_max_over_time`, :func:`one_hot_targets` — loss helpers that honour the
  batch's ``valid`` mask [B, T].
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


class BiLSTM(nn.Module):
    """Batch-first bidirectional LSTM: [B, T, input_size] -> [B, T, 2 * hidden]."""

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


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
    """Audio-guided visual attention (Tian et al. 2018, eq. 2-4).

    ``x_t = W_f tanh(W_v U_v(v_t) + (W_a U_a(a_t)) 1^T)``, ``w_t = softmax(x_t)``,
    ``v_t^att = sum_i w_t^i v_t^i``. U_v, U_a: Linear + ReLU to ``hidden``; W_v, W_a: hidden -> regions;
    W_f: regions -> 1 (no bias, as in the reference code).

    ``audio_term_axis``: in eq. 4 the audio term W_a U_a(a_t) 1^T is indexed by the axis that W_f
    contracts ("hidden"); the reference code (YapengTian/AVE-ECCV18) adds it along the region axis
    ("region", the default, as in :class:`train.heads.avel.AGVA`).

    forward(audio [B, T, Da], visual [B, T, R, Dv]) -> (attended [B, T, Dv], logits x [B, T, R]).
    """

    def __init__(self, audio_dim: int = 128, visual_dim: int = 512, hidden: int = 512, regions: int = 49,
                 audio_term_axis: str = "region"):
        super().__init__()
        if audio_term_axis not in ("region", "hidden"):
            raise ValueError(f"audio_term_axis must be 'region' or 'hidden', got {audio_term_axis!r}")
        self.audio_term_axis = audio_term_axis
        self.u_audio = nn.Sequential(nn.Linear(audio_dim, hidden), nn.ReLU())
        self.u_visual = nn.Sequential(nn.Linear(visual_dim, hidden), nn.ReLU())
        self.w_visual = nn.Linear(hidden, regions, bias=False)
        self.w_audio = nn.Linear(hidden, regions, bias=False)
        self.w_f = nn.Linear(regions, 1, bias=False)

    def logits(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """x_t of eq. 4: [B, T, R] (before the softmax of eq. 3)."""
        content = self.w_visual(self.u_visual(visual))  # [B, T, R regions, k]
        audio_term = self.w_audio(self.u_audio(audio))  # [B, T, k]
        axis = -1 if self.audio_term_axis == "region" else -2
        return self.w_f(torch.tanh(content + audio_term.unsqueeze(axis))).squeeze(-1)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.logits(audio, visual)
        weights = x.softmax(dim=-1)
        return torch.einsum("btr,btrd->btd", weights, visual), x


def mfb_pool(product: torch.Tensor, k: int) -> torch.Tensor:
    """MFB output stage (BMFN eq. 2 after the dropout): sum-pool groups of ``k`` consecutive
    features, signed square root, L2 normalisation. [..., d_m] -> [..., d_m / k]."""
    if product.shape[-1] % k:
        raise ValueError(f"MFB: feature size {product.shape[-1]} is not a multiple of the pool size {k}")
    pooled = product.unflatten(-1, (product.shape[-1] // k, k)).sum(-1)
    powered = torch.sign(pooled) * torch.sqrt(pooled.abs() + 1e-12)  # eps keeps the gradient finite at 0
    return F.normalize(powered, dim=-1)


def valid_mask(batch: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The batch's ``valid`` [B, T] as bool, or all-true shaped like ``like``'s first two axes."""
    valid = batch.get("valid") if hasattr(batch, "get") else None
    if valid is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return valid.to(device=like.device, dtype=torch.bool)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, T] over the entries where ``mask`` [B, T] is true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_max_over_time(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the segments of ``scores`` [B, T, C] where ``mask`` [B, T] is true -> [B, C]."""
    fill = torch.finfo(scores.dtype).min
    return scores.masked_fill(~mask.unsqueeze(-1), fill).max(dim=1).values


def masked_mean_over_time(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the segments of ``scores`` [B, T, C] where ``mask`` [B, T] is true -> [B, C]."""
    m = mask.unsqueeze(-1).to(scores.dtype)
    return (scores * m).sum(1) / m.sum(1).clamp_min(1.0)


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot of class indices: [...] long -> [..., num_classes]."""
    return F.one_hot(labels.long(), num_classes).to(torch.float32)
