"""Space-Time Memory network for sounding object localization (Li, Tian & Xu, BMVC 2021).

Inputs (channels last, as the ``resnet152_maps`` / ``vggish_maps`` extractors store them)::

    audio  [B, T, 6, 4, Ca]     VGGish conv-trunk map of the audio aligned with each timestep (Ca = 512)
    visual [B, T, 8, 8, Cv]     ResNet-152 conv5 map of each frame at 256x256 input (Cv = 2048)
    ->  HeadOutput.scores [B, T, C]        event class logits per timestep (background included)
        spatial [B, T, 8, 8]               the sounding-object map (softmax over the 64 positions)

Timesteps are consecutive frames (the paper trains on T = 4 frames of one random second).

Building blocks (section 3.2):

- projections to the D = 256 joint space: 1x1 convolutions with ReLU; as in the authors' code
  (``sol/models/stm_nets.py`` ``Match``) audio Ca -> Ca/2 -> D and visual Cv -> Cv/2 -> Cv/4 -> D,
  each convolution followed by batch norm, ReLU between them; the audio and visual vectors/maps
  are L2-normalised over channels (``normalize``, on in the authors' training script);
- cross-modal spatial attention f (eq. 1): ``alpha(i, j) = softmax_ij(x_v(i, j) . phi(x_a))``
  with ``phi`` global (max) pooling; ``x_av = alpha * x_v``;
- multi-modal temporal attention g (eq. 2, one head, d = D): ``beta = softmax_k(phi(x^t) W_q .
  (phi(x^k) W_k)^T / sqrt(D))`` over the current step and the K previous ones, and
  ``x^t <- beta^{t,t} x^t + sum_k beta^{k,t} x^k`` (maps are combined, the weights come from the
  pooled vectors). Memory is causal: step t sees steps ``max(0, t-K) .. t``.

The spatio-temporal memory layer (Algorithm 1) per step t::

    a^ = g(x_a^t, {x_a^k})  ;  v^ = g(x_v^t, {x_v^k})              uni-modal temporal attention
    av^ = f(a^, v^) * v^                                           cross-modal spatial attention
    av^ = g(av^, {x_av^k})  with x_av^k = f(x_a^k, x_v^k) * x_v^k   cross-modal temporal attention
    map = f(a^, av^)                                               section 3.3
    O^t = [sum_ij av^(i, j) ; phi(a^)]  -> MLP (2D -> D -> classes)  section 3.4

Ablations (Table 2) via ``memory``: ``"cross+uni"`` (C+U, the full model), ``"uni"`` (no
cross-modal memory: map = f(a^, v^)), ``"none"`` (no temporal attention: every step alone).

Differences from the authors' code, kept on purpose: temporal attention runs in the 256-D joint
space after the projections (paper: "256-D embedding dimension"; the code attends on the 512/2048-D
encoder maps before projecting), the memory window is the K previous steps (paper) rather than a
centred window, and only the query/key projections of eq. 2 exist (the code's
``nn.MultiheadAttention`` also holds value/output projections whose outputs it discards).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import register_head
from .base import Head, HeadOutput, segment_loss


@dataclasses.dataclass
class STMConfig:
    """Options of the STM head (``heads: {stm: {...}}`` in pipeline.yaml)."""

    #: channels of the stored maps: ResNet-152 conv5 (2048) and the VGGish conv trunk (512)
    visual_channels: int = 2048
    audio_channels: int = 512
    #: joint space / attention dimension D (paper: 256)
    dim: int = 256
    #: "cross+uni" (full model), "uni" (uni-modal memory only), "none" (no temporal memory)
    memory: Literal["cross+uni", "uni", "none"] = "cross+uni"
    #: K previous timesteps attended by the temporal attention g
    memory_size: int = 3
    #: global pooling phi: "max" (authors' code) or "mean"
    pool: Literal["max", "mean"] = "max"
    #: L2-normalise the projected audio vector and visual map over channels (authors' --normalize)
    normalize: bool = True
    #: hidden width of the classifier MLP (authors' AVE classifier: 2D -> D -> classes)
    hidden: int = 256


def projection(in_channels: int, out_channels: int, depth: int) -> nn.Sequential:
    """1x1 conv stack halving the width ``depth - 1`` times, then to ``out_channels``; BN after
    each conv, ReLU between convs (none after the last)."""
    layers: list[nn.Module] = []
    width = in_channels
    for _ in range(depth - 1):
        nxt = max(1, width // 2)
        layers += [nn.Conv2d(width, nxt, 1), nn.BatchNorm2d(nxt), nn.ReLU()]
        width = nxt
    layers += [nn.Conv2d(width, out_channels, 1), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers)


def global_pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """phi: [..., C, H, W] -> [..., C] by max or mean over the spatial positions."""
    flat = x.flatten(-2)
    return flat.amax(-1) if how == "max" else flat.mean(-1)


def spatial_attention(audio_vec: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. 1: audio_vec [..., C], visual [..., C, H, W] -> alpha [..., H, W], softmax over H*W."""
    logits = torch.einsum("...c,...chw->...hw", audio_vec, visual)
    return logits.flatten(-2).softmax(-1).view_as(logits)


def shift_time(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, ...] -> [B, T, ...] with step t holding x[:, t - k] (zeros for t < k)."""
    if k == 0:
        return x
    pad = x.new_zeros((x.shape[0], min(k, x.shape[1])) + tuple(x.shape[2:]))
    return torch.cat([pad, x[:, : max(0, x.shape[1] - k)]], dim=1)


class TemporalAttention(nn.Module):
    """Eq. 2 with one head: weights over the current step and the K previous ones, from pooled
    vectors through learned query/key projections (d = ``dim``), applied to whole maps."""

    def __init__(self, dim: int, memory_size: int, pool: str):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.memory_size = memory_size
        self.pool = pool
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, current: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """current [B, T, C, H, W] (the step's own map, query and offset-0 value); memory
        [B, T, C, H, W] (what past steps contribute; default ``current``).

        Returns (propagated [B, T, C, H, W], weights [B, T, K+1]; weights[..., k] belongs to
        step t-k, and is 0 for steps before the start)."""
        memory = current if memory is None else memory
        B, T = current.shape[:2]
        K = min(self.memory_size, T - 1)
        q = self.query(global_pool(current, self.pool))  # B, T, C
        keys_now = self.key(global_pool(current, self.pool))
        keys_mem = self.key(global_pool(memory, self.pool))
        logits = [(q * keys_now).sum(-1)]
        for k in range(1, K + 1):
            logits.append((q * shift_time(keys_mem, k)).sum(-1))
        logits_t = torch.stack(logits, -1) * self.scale  # B, T, K+1
        steps = torch.arange(T, device=current.device)[:, None]
        offsets = torch.arange(K + 1, device=current.device)[None, :]
        logits_t = logits_t.masked_fill((steps - offsets < 0)[None], float("-inf"))
        weights = logits_t.softmax(-1)
        out = weights[..., 0, None, None, None] * current
        for k in range(1, K + 1):
            out = out + weights[..., k, None, None, None] * shift_time(memory, k)
        return out, weights


@register_head("stm")
class STMHead(Head):
    """Space-Time Memory network; see the module docstring for shapes and the algorithm."""

    task = "sol"
    settings = ("supervised",)
    Config = STMConfig
    #: section 4.2: Adam, lr 1e-4, batch 128, 30 epochs
    train_defaults = {"lr": 1e-4, "batch_size": 128, "epochs": 30, "weight_decay": 0.0}

    def __init__(self, num_classes: int, setting: str = "supervised", config: Any = None):
        super().__init__(num_classes, setting, config)
        c = self.config
        if c.memory_size < 0:
            raise ValueError(f"heads.stm.memory_size must be >= 0, got {c.memory_size}")
        self.audio_proj = projection(c.audio_channels, c.dim, depth=2)
        self.visual_proj = projection(c.visual_channels, c.dim, depth=3)
        if c.memory != "none":
            self.memory_audio = TemporalAttention(c.dim, c.memory_size, c.pool)
            self.memory_visual = TemporalAttention(c.dim, c.memory_size, c.pool)
        if c.memory == "cross+uni":
            self.memory_cross = TemporalAttention(c.dim, c.memory_size, c.pool)
        self.classifier = nn.Sequential(nn.Linear(2 * c.dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, num_classes))

    # -- pieces ------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        """[B, T, H, W, C] channels-last -> [B, T, D, H, W] in the joint space."""
        B, T, H, W, C = x.shape
        flat = x.reshape(B * T, H, W, C).permute(0, 3, 1, 2).float()
        return proj(flat).reshape(B, T, -1, H, W)

    def _audio_vector(self, audio_map: torch.Tensor) -> torch.Tensor:
        vec = global_pool(audio_map, self.config.pool)
        return F.normalize(vec, dim=-1) if self.config.normalize else vec

    def _visual_map(self, visual_map: torch.Tensor) -> torch.Tensor:
        return F.normalize(visual_map, dim=2) if self.config.normalize else visual_map

    def _attend(self, audio_map: torch.Tensor, visual_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f and x_av: ([B, T, H, W] attention, [B, T, D, H, W] attended visual map)."""
        vis = self._visual_map(visual_map)
        alpha = spatial_attention(self._audio_vector(audio_map), vis)
        return alpha, alpha.unsqueeze(2) * vis

    # -- forward -----------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> HeadOutput:
        if audio.dim() != 5 or visual.dim() != 5 or audio.shape[:2] != visual.shape[:2]:
            raise ValueError(
                f"stm expects audio [B, T, h, w, Ca] and visual [B, T, H, W, Cv] with equal B, T; "
                f"got {tuple(audio.shape)} and {tuple(visual.shape)}"
            )
        memory = self.config.memory
        x_a = self._project(audio, self.audio_proj)
        x_v = self._project(visual, self.visual_proj)
        extras: dict[str, torch.Tensor] = {}
        if memory == "none":
            a_hat, v_hat = x_a, x_v
        else:
            a_hat, w_a = self.memory_audio(x_a)
            v_hat, w_v = self.memory_visual(x_v)
            extras.update(temporal_audio=w_a, temporal_visual=w_v)
        alpha, av_hat = self._attend(a_hat, v_hat)
        if memory == "cross+uni":
            _, x_av = self._attend(x_a, x_v)  # per-step cross-modal features: the memory entries
            av_hat, w_av = self.memory_cross(av_hat, x_av)
            extras["temporal_cross"] = w_av
            alpha = spatial_attention(self._audio_vector(a_hat), av_hat)
        a_vec = self._audio_vector(a_hat)
        joint = torch.cat([av_hat.sum((-2, -1)), a_vec], dim=-1)  # B, T, 2D
        return HeadOutput(scores=self.classifier(joint), extras=extras, spatial=alpha)

    def loss(self, out: HeadOutput, batch: Mapping[str, torch.Tensor], weak_pool: str = "mean") -> torch.Tensor:
        """Cross-entropy of every timestep's logits against its segment class (background
        included): ``batch['labels']`` [B, T]."""
        return segment_loss(out.scores, batch["labels"])
