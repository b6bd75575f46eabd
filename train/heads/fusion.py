"""The audio-visual fusion modules compared in Tian et al., ECCV 2018, Table 2 (and Sec. 4.3).

Every module maps an audio vector and a visual vector to one fused vector, on any leading shape::

    fuse(a [..., dim_a], v [..., dim_v]) -> [..., dim]

so the same module serves the three positions of Table 2 (see :mod:`train.heads.avel`): early
(pre-trained audio [128] + attended visual [512], before the LSTM), late (the two BiLSTM outputs,
[256] each) and decision (the two per-modality class scores, [C] each).

Where the formulas come from. Tian et al. name the methods but give formulas only for DMRN (eq. 5-6);
the public reference (YapengTian/AVE-ECCV18) ships code only for DMRN (``models_fusion.py``,
``TBMRF_Net.TBMRF_block``). The others follow the papers Tian et al. cite for them, as read by us:

* ``additive``  (Kiela et al. 2018 [28]):  ``W_a a + W_v v + b``
* ``maxpool``   ([28], "MP"):             ``max(W_a a + b_a, W_v v + b_v)`` element-wise
* ``gated``     ([28]):                   ``(W_v v + b_v) * sigmoid(W_g a + b_g)``: the audio gates
  the projected visual vector (our choice of direction, in the spirit of audio-guided attention)
* ``mb``        ([28], multimodal bilinear): ``y_k = a^T W_k v + b_k`` (full bilinear,
  ``torch.nn.Bilinear``; dim_a*dim_v*dim weights)
* ``gmb``       ([28], gated multimodal bilinear): ``mb(a, v) * sigmoid(W_g a + b_g)``
* ``gmu``       (Arevalo et al. 2017 [4], eq. of the GMU, no biases as written there):
  ``z = sigmoid(W_z [a; v]); z * tanh(W_a a) + (1 - z) * tanh(W_v v)``
* ``concat``:  ``W [a; v] + b``
* ``mrn``       (Kim et al. 2016 [29], one block per ``blocks``; the audio is the residual branch
  that gets updated, like the text branch of [29]):
  ``a <- W_s a + tanh(W_2 tanh(W_1 a)) * tanh(W_4 tanh(W_3 v))``
* ``dmrn``      (Tian et al. eq. 5-6 as coded in ``TBMRF_block``): ``U_a``, ``U_v`` are
  Linear-Tanh-Linear; per block ``m = (U_v(v) + U_a(a)) / 2``; the reference then sets
  ``video <- tanh(audio + m)`` and ``audio <- tanh(video + m)`` (each stream takes the OTHER stream's
  residual, unlike eq. 5-6; identical for the averaged output of one block, different for more
  blocks, so we follow the code); output ``(audio + video) / 2``. The reference shares ``U_a``/``U_v``
  across blocks and has no input projection; ours adds a Linear projection only when an input
  width differs from ``dim`` (early and decision positions), so the late position is exactly the
  reference.

``FUSIONS`` maps the CLI method names to their classes; :func:`make_fusion` builds one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Additive(nn.Module):
    """``W_a a + W_v v + b`` -> [..., dim]."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, dim)
        self.proj_v = nn.Linear(dim_v, dim, bias=False)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.proj_a(a) + self.proj_v(v)


class MaxPooling(nn.Module):
    """Element-wise ``max(W_a a + b_a, W_v v + b_v)`` -> [..., dim]."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, dim)
        self.proj_v = nn.Linear(dim_v, dim)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.proj_a(a), self.proj_v(v))


class Gated(nn.Module):
    """``(W_v v + b_v) * sigmoid(W_g a + b_g)`` -> [..., dim] (audio gates vision)."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__()
        self.proj_v = nn.Linear(dim_v, dim)
        self.gate_a = nn.Linear(dim_a, dim)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.proj_v(v) * torch.sigmoid(self.gate_a(a))


class MultimodalBilinear(nn.Module):
    """``y_k = a^T W_k v + b_k`` -> [..., dim]; ``dim_a * dim_v * dim + dim`` parameters."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__()
        self.bilinear = nn.Bilinear(dim_a, dim_v, dim)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # the same map as self.bilinear(a, v), as one matmul over the outer product a v^T: on CPU
        # torch's bilinear kernel is ~40x slower (forward and backward) at these sizes
        outer = (a.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)  # [..., dim_a * dim_v]
        weight = self.bilinear.weight.flatten(1)  # [dim, dim_a * dim_v]
        return F.linear(outer, weight, self.bilinear.bias)


class GatedMultimodalBilinear(MultimodalBilinear):
    """``(a^T W_k v + b_k) * sigmoid(W_g a + b_g)`` -> [..., dim]."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__(dim_a, dim_v, dim)
        self.gate_a = nn.Linear(dim_a, dim)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return super().forward(a, v) * torch.sigmoid(self.gate_a(a))


class GMU(nn.Module):
    """Gated multimodal unit (Arevalo et al. 2017): ``z * tanh(W_a a) + (1 - z) * tanh(W_v v)``,
    ``z = sigmoid(W_z [a; v])`` -> [..., dim]."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, dim, bias=False)
        self.proj_v = nn.Linear(dim_v, dim, bias=False)
        self.gate = nn.Linear(dim_a + dim_v, dim, bias=False)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.gate(torch.cat([a, v], dim=-1)))
        return z * torch.tanh(self.proj_a(a)) + (1 - z) * torch.tanh(self.proj_v(v))


class Concat(nn.Module):
    """``W [a; v] + b`` -> [..., dim]."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim_a + dim_v, dim)

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([a, v], dim=-1))


class MRNBlock(nn.Module):
    """One multimodal residual block of Kim et al. 2016: only the audio branch is updated."""

    def __init__(self, dim_a: int, dim_v: int, dim: int):
        super().__init__()
        self.shortcut = nn.Linear(dim_a, dim)
        self.audio_path = nn.Sequential(nn.Linear(dim_a, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Tanh())
        self.visual_path = nn.Sequential(nn.Linear(dim_v, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Tanh())

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.shortcut(a) + self.audio_path(a) * self.visual_path(v)


class MRN(nn.Module):
    """``blocks`` stacked :class:`MRNBlock` (each sees the input visual vector) -> [..., dim]."""

    def __init__(self, dim_a: int, dim_v: int, dim: int, blocks: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(MRNBlock(dim_a if i == 0 else dim, dim_v, dim) for i in range(blocks))

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            a = block(a, v)
        return a


def _residual_transform(dim: int) -> nn.Sequential:
    """``U_a`` / ``U_v`` of the reference DMRN: Linear(dim, dim) - Tanh - Linear(dim, dim)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))


class DMRN(nn.Module):
    """Dual multimodal residual network (Tian et al. eq. 5-6; reference ``TBMRF_block``).

    a [..., dim_a], v [..., dim_v] -> [..., dim]. Parameters with dim_a = dim_v = dim = 256 (late):
    2 * 2 * (256 * 256 + 256) = 263,168 (``U_a`` and ``U_v``), exactly the reference's."""

    def __init__(self, dim_a: int, dim_v: int, dim: int, blocks: int = 1):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"DMRN needs blocks >= 1, got {blocks}")
        self.blocks = blocks
        self.proj_a = nn.Linear(dim_a, dim) if dim_a != dim else nn.Identity()
        self.proj_v = nn.Linear(dim_v, dim) if dim_v != dim else nn.Identity()
        self.U_v = _residual_transform(dim)
        self.U_a = _residual_transform(dim)

    def updated_pair(self, a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The updated (audio, video) streams after all blocks, before averaging."""
        audio, video = self.proj_a(a), self.proj_v(v)
        for _ in range(self.blocks):
            merged = 0.5 * (self.U_v(video) + self.U_a(audio))
            # reference order: the new video stream takes the audio residual and vice versa
            video, audio = torch.tanh(audio + merged), torch.tanh(video + merged)
        return audio, video

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        audio, video = self.updated_pair(a, v)
        return 0.5 * (video + audio)


#: CLI method name -> (class, name in the paper's Table 2)
FUSIONS: dict[str, tuple[type[nn.Module], str]] = {
    "additive": (Additive, "Additive"),
    "maxpool": (MaxPooling, "MP"),
    "gated": (Gated, "Gated"),
    "mb": (MultimodalBilinear, "MB"),
    "gmu": (GMU, "GMU"),
    "gmb": (GatedMultimodalBilinear, "GMB"),
    "concat": (Concat, "Concat"),
    "mrn": (MRN, "MRN"),
    "dmrn": (DMRN, "DMRN"),
}


#: the methods made of stacked residual blocks (the only ones with a ``blocks`` option)
RESIDUAL = ("mrn", "dmrn")


def make_fusion(method: str, dim_a: int, dim_v: int, dim: int, blocks: int | None = None) -> nn.Module:
    """Build fusion ``method`` (a key of :data:`FUSIONS`) for inputs of width dim_a / dim_v;
    ``blocks`` is given for the residual methods (:data:`RESIDUAL`) and only for them."""
    try:
        cls = FUSIONS[method][0]
    except KeyError:
        raise ValueError(f"unknown fusion method {method!r}; known: {', '.join(FUSIONS)}") from None
    if (blocks is not None) != (method in RESIDUAL):
        raise ValueError(f"fusion {method!r}: blocks is an option of {', '.join(RESIDUAL)} only")
    return cls(dim_a, dim_v, dim, blocks=blocks) if blocks is not None else cls(dim_a, dim_v, dim)
