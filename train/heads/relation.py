"""Cross-modal relation layers of CMRAN (Xu et al., ACM MM 2020, public code FloretCat/CMRAN), shared by
the heads that reuse them (CMRAN, CMBS of marmot-xy/CMBS, CACE-Net of Brain-Cog-Lab/CACE-Net).

Every layer here is created once in ``__init__``, only layers that a forward pass runs are built, and the
parameter names are those of the reference code (``model/models.py``, ``model/main_model.py``), so a
state-dict key map to a reference model only has to rename the enclosing modules.

Tensor layout: every layer takes and returns BATCH-FIRST tensors ``[B, T, d]``. (The references work
time-first ``[T, B, d]``; the layers here transpose around ``nn.MultiheadAttention``, which is built
time-first as in the references, so the arithmetic is theirs.)

Layers (reference name -> here)
-------------------------------
* ``New_Audio_Guided_Attention`` (AGSCA, the audio-guided spatial-channel attention) ->
  :class:`AudioGuidedSpatialChannelAttention`. Channel attention, then audio-guided spatial attention
  over the channel-attended map. Composable: :meth:`~AudioGuidedSpatialChannelAttention.channel_weights`,
  :meth:`~AudioGuidedSpatialChannelAttention.channel_attend`,
  :meth:`~AudioGuidedSpatialChannelAttention.spatial_weights` and
  :meth:`~AudioGuidedSpatialChannelAttention.attend` (``channel_query=``: the map the channel attention
  reads when it is not the attended map itself, as in CMBS / CACE-Net, whose channel query is the output
  of their visual self-attention branch while the weights multiply the raw map). CMBS's extra visual
  self-attention branch (weight ``beta``) is NOT here: a head adds it around :meth:`attend`.
  The reference's ``affine_video_guided_1/2`` (CMRAN; registered, never run) are not built.
* ``EncoderLayer`` -> :class:`EncoderLayer` (post-LN self-attention + ReLU feed-forward).
* ``DecoderLayer`` -> :class:`DecoderLayer`, the cross-modal relation attention (CMRA) layer: the query
  attends over ``cat(memory, query)`` along time, then the feed-forward. The reference also registers a
  ``self_attn`` that its forward never runs (CMRAN, CMBS and CACE-Net alike); it is not built.
* ``InternalTemporalRelationModule`` -> :class:`InternalTemporalRelation` (``affine_matrix`` + a stack of
  encoder layers; reference: 4 heads, 2 layers).
* ``CrossModalRelationAttModule`` -> :class:`CrossModalRelationAttention` (``affine_matrix`` + a stack of
  decoder layers; reference: 4 heads, 1 layer).
  The references wrap the stacks in ``Encoder`` / ``Decoder`` modules that deep-copy a template layer
  which stays registered (``encoder_layer`` / ``decoder_layer``) but never runs; here the stack is a
  plain ``layers`` ModuleList (reference key ``encoder.layers.i`` / ``decoder.layers.i`` -> ``layers.i``).
* ``AudioVideoInter`` -> :class:`AudioVisualInteraction` (the audio-visual interaction module: the
  product ``video * audio`` attends over ``cat(audio, video)`` along time, residual + LayerNorm).

Sizes that differ between the repositories are arguments: the feed-forward width ``ffn_dim`` (CMRAN
2048; CMBS 1024, and 2048 in its weak encoders), heads, layers, dropout (transformer layers 0.1;
interaction attention dropout CMRAN 0.1, CMBS 0.2, its residual dropout 0.1 in both), and the widths of
AGSCA (CMRAN: channel width 512 = visual width, bottleneck / spatial width 256).

Parameter counts at the reference sizes (d = 256, 4 heads): EncoderLayer(256, ffn 2048) 1,315,072;
DecoderLayer(256, ffn 2048) 1,315,072 (the reference's, with its idle ``self_attn``: 1,578,240);
AudioVisualInteraction(256) 263,680; AGSCA(128, 512, 512, 256) 756,225 (CMRAN's, with the idle
``affine_video_guided_1/2`` (512 -> 64 -> 128): 797,377).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "AudioGuidedSpatialChannelAttention",
    "EncoderLayer",
    "DecoderLayer",
    "InternalTemporalRelation",
    "CrossModalRelationAttention",
    "AudioVisualInteraction",
]


def _time_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)


class _FeedForwardSublayer(nn.Module):
    """The second half of the reference Encoder/DecoderLayer: ``norm2(x + dropout2(linear2(dropout(
    relu(linear1(x))))))``; also holds ``norm1`` / ``dropout1`` of the attention half."""

    def __init__(self, d: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def residual(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """``norm1(x + dropout1(attended))`` then the feed-forward block."""
        x = self.norm1(x + self.dropout1(attended))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class EncoderLayer(_FeedForwardSublayer):
    """Reference ``EncoderLayer(d_model, nhead, dim_feedforward, dropout)``, post-LN, ReLU:
    ``x = norm1(x + dropout1(SelfAttn(x)))``; ``x = norm2(x + dropout2(linear2(dropout(relu(linear1(x))))))``.

    forward(x [B, T, d]) -> [B, T, d]. Parameters: ``self_attn`` (nn.MultiheadAttention(d, heads,
    dropout), time-first), ``linear1`` (d -> ffn_dim), ``linear2`` (ffn_dim -> d), ``norm1``, ``norm2``:
    4 d^2 + 4 d + 2 d ffn_dim + ffn_dim + d + 4 d."""

    def __init__(self, d: int, heads: int, ffn_dim: int = 2048, dropout: float = 0.1):
        super().__init__(d, ffn_dim, dropout)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = _time_first(x)
        attended = self.self_attn(xt, xt, xt, need_weights=False)[0]
        return self.residual(x, _time_first(attended))


class DecoderLayer(_FeedForwardSublayer):
    """Reference ``DecoderLayer``: cross-modal relation attention (CMRA). The query attends over the
    memory AND itself, concatenated along time (memory first):
    ``q = norm1(q + dropout1(Attn(q, cat(m, q), cat(m, q))))``, then the feed-forward block of
    :class:`EncoderLayer`.

    forward(query [B, Tq, d], memory [B, Tm, d]) -> [B, Tq, d]. Parameters: ``multihead_attn``
    (nn.MultiheadAttention(d, heads, dropout), time-first), ``linear1``, ``linear2``, ``norm1``, ``norm2``
    (the reference's unused ``self_attn`` is not built)."""

    def __init__(self, d: int, heads: int, ffn_dim: int = 2048, dropout: float = 0.1):
        super().__init__(d, ffn_dim, dropout)
        self.multihead_attn = nn.MultiheadAttention(d, heads, dropout=dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        qt = _time_first(query)
        kv = torch.cat([_time_first(memory), qt], dim=0)
        attended = self.multihead_attn(qt, kv, kv, need_weights=False)[0]
        return self.residual(query, _time_first(attended))


class InternalTemporalRelation(nn.Module):
    """Reference ``InternalTemporalRelationModule(input_dim, d_model)`` (the internal temporal relation
    module, self-attention over the segments of one modality):
    ``affine_matrix`` Linear(input_dim, d) (no activation), then ``layers`` encoder layers.

    forward(x [B, T, input_dim]) -> [B, T, d]. Reference: heads 4, 2 layers, ffn_dim 2048 (CMRAN)."""

    def __init__(self, input_dim: int, d: int, heads: int = 4, ffn_dim: int = 2048, layers: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.affine_matrix = nn.Linear(input_dim, d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ffn_dim, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.affine_matrix(x)
        for layer in self.layers:
            x = layer(x)
        return x


class CrossModalRelationAttention(nn.Module):
    """Reference ``CrossModalRelationAttModule(input_dim, d_model)``: ``affine_matrix``
    Linear(input_dim, d) on the query (one modality's raw features), then ``layers`` CMRA decoder
    layers against the memory (the other modality's :class:`InternalTemporalRelation` output).

    forward(query [B, T, input_dim], memory [B, Tm, d]) -> [B, T, d]. Reference: heads 4, 1 layer,
    ffn_dim 2048 (CMRAN)."""

    def __init__(self, input_dim: int, d: int, heads: int = 4, ffn_dim: int = 2048, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.affine_matrix = nn.Linear(input_dim, d)
        self.layers = nn.ModuleList(DecoderLayer(d, heads, ffn_dim, dropout) for _ in range(layers))

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.affine_matrix(query)
        for layer in self.layers:
            x = layer(x, memory)
        return x


class AudioVisualInteraction(nn.Module):
    """Reference ``AudioVideoInter(d_model, n_head, head_dropout)``:
    ``g = video * audio``; ``out = norm1(g + dropout(Attn(g, cat(audio, video), cat(audio, video))))``
    (concatenation along time, audio first).

    forward(video [B, T, d], audio [B, T, d]) -> [B, T, d]. ``attn_dropout`` = the reference's
    ``head_dropout`` (attention-weight dropout of ``video_multihead``; CMRAN 0.1, CMBS 0.2),
    ``dropout`` = its residual ``nn.Dropout(0.1)``. Parameters: ``video_multihead``, ``norm1``."""

    def __init__(self, d: int, heads: int, attn_dropout: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.video_multihead = nn.MultiheadAttention(d, heads, dropout=attn_dropout)
        self.norm1 = nn.LayerNorm(d)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        g = video * audio
        gt = _time_first(g)
        memory = torch.cat([_time_first(audio), _time_first(video)], dim=0)
        attended = self.video_multihead(gt, memory, memory, need_weights=False)[0]
        return self.norm1(g + self.dropout(_time_first(attended)))


class AudioGuidedSpatialChannelAttention(nn.Module):
    """AGSCA, reference ``New_Audio_Guided_Attention`` (CMRAN; CMBS / CACE-Net add a visual
    self-attention branch around it), with its layer names. Per segment, with a the audio vector
    [Da] and V the visual map [R, Dv] (R = 49 regions, row-major):

    channel attention (:meth:`channel_weights`, :meth:`channel_attend`)::

        q   = mean_r( relu(affine_audio_1(a)) * relu(affine_video_1(Q_r)) )       [channel_dim]
        w_c = sigmoid(affine_v_c_att(relu(affine_bottleneck(q))))                   [Dv]
        V_c = V * (w_c + 1)                                                         [R, Dv]

    where Q = V (CMRAN) or the ``channel_query`` map (CMBS / CACE-Net: their self-attended map);

    spatial attention (:meth:`spatial_weights`) over V_c::

        w_s = softmax_r( tanh(affine_v_s_att( relu(affine_video_2(V_c_r)) * relu(affine_audio_2(a)) )) )  [R]

    and :meth:`attend` / forward return ``(sum_r w_s[r] V_c[r]  [B, T, Dv],  w_s [B, T, R])``.

    Shapes: audio [B, T, Da]; visual [B, T, R, Dv] or [B, T, H, W, Dv] (flattened row-major to R = H W,
    as the reference's ``reshape(batch, t, -1, v_dim)``). Sizes: ``affine_video_1`` Dv -> channel_dim,
    ``affine_audio_1`` Da -> channel_dim, ``affine_bottleneck`` channel_dim -> hidden,
    ``affine_v_c_att`` hidden -> Dv, ``affine_video_2`` Dv -> hidden, ``affine_audio_2`` Da -> hidden,
    ``affine_v_s_att`` hidden -> 1. Reference (CMRAN, CMBS): Da 128, Dv 512, channel_dim 512, hidden 256:
    756,225 parameters."""

    def __init__(self, audio_dim: int = 128, visual_dim: int = 512, channel_dim: int = 512, hidden: int = 256):
        super().__init__()
        # channel attention
        self.affine_video_1 = nn.Linear(visual_dim, channel_dim)
        self.affine_audio_1 = nn.Linear(audio_dim, channel_dim)
        self.affine_bottleneck = nn.Linear(channel_dim, hidden)
        self.affine_v_c_att = nn.Linear(hidden, visual_dim)
        # spatial attention
        self.affine_video_2 = nn.Linear(visual_dim, hidden)
        self.affine_audio_2 = nn.Linear(audio_dim, hidden)
        self.affine_v_s_att = nn.Linear(hidden, 1)

    @staticmethod
    def regions(visual: torch.Tensor) -> torch.Tensor:
        """[B, T, H, W, Dv] -> [B, T, H W, Dv]; a [B, T, R, Dv] map is returned as is."""
        return visual.flatten(2, 3) if visual.dim() == 5 else visual

    def channel_weights(self, audio: torch.Tensor, query_map: torch.Tensor) -> torch.Tensor:
        """w_c [B, T, Dv] (after the sigmoid, before the +1) from audio [B, T, Da] and the map the
        channel attention reads, [B, T, R, Dv] (or [B, T, H, W, Dv])."""
        query_map = self.regions(query_map)
        joint = F.relu(self.affine_audio_1(audio)).unsqueeze(-2) * F.relu(self.affine_video_1(query_map))
        return torch.sigmoid(self.affine_v_c_att(F.relu(self.affine_bottleneck(joint.mean(dim=-2)))))

    def channel_attend(self, audio: torch.Tensor, visual: torch.Tensor,
                       channel_query: torch.Tensor | None = None) -> torch.Tensor:
        """V_c = V * (w_c + 1): [B, T, R, Dv]. ``channel_query`` (default: ``visual``) is the map the
        channel weights are computed from; they always multiply ``visual``."""
        visual = self.regions(visual)
        weights = self.channel_weights(audio, visual if channel_query is None else channel_query)
        return visual * (weights.unsqueeze(-2) + 1)

    def spatial_weights(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """w_s [B, T, R]: audio-guided softmax over the regions of ``visual`` [B, T, R, Dv] (the
        channel-attended map V_c in AGSCA)."""
        visual = self.regions(visual)
        joint = F.relu(self.affine_video_2(visual)) * F.relu(self.affine_audio_2(audio)).unsqueeze(-2)
        return torch.tanh(self.affine_v_s_att(joint)).squeeze(-1).softmax(dim=-1)

    def attend(self, audio: torch.Tensor, visual: torch.Tensor,
               channel_query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole AGSCA: (channel-spatial attended feature [B, T, Dv], spatial weights w_s [B, T, R]).
        audio [B, T, Da], visual [B, T, R, Dv] or [B, T, H, W, Dv]; ``channel_query`` as in
        :meth:`channel_attend`."""
        attended_map = self.channel_attend(audio, visual, channel_query)
        weights = self.spatial_weights(audio, attended_map)
        return torch.einsum("btr,btrd->btd", weights, attended_map), weights

    def forward(self, audio: torch.Tensor, visual: torch.Tensor,
                channel_query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(audio, visual, channel_query)
