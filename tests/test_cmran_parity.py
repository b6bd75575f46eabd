"""Parity of the ``cmran`` head and of :mod:`train.heads.relation` with the public CMRAN code
(FloretCat/CMRAN).

The reference side is rebuilt here from the published definitions (``model/models.py``: Encoder,
Decoder, EncoderLayer, DecoderLayer, New_Audio_Guided_Attention; ``model/main_model.py``:
InternalTemporalRelationModule, CrossModalRelationAttModule, AudioVideoInter, SupvLocalizeModule,
WeaklyLocalizationModule, supv_main_model, weak_main_model; the loss and accuracy lines of
``supv_main.py`` / ``weakly_main.py``): same layer names, forward order and time-first layout, written for
CPU and float64 (the original calls ``.cuda()``), with the number of classes as an argument. It registers
the layers the reference registers but never runs (template layers of Encoder/Decoder, the decoder's
``self_attn``, AGSCA's ``affine_video_guided_*``) so that its parameter count is the reference's.
Identical weights are loaded into both sides through an explicit state-dict key map.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from train.heads import relation
from train.heads.cmran import CMRANHead
from train.heads.base import split_loss
from train.registry import get_head

from heads_testutils import n_params, one_thread  # noqa: F401  (one torch thread per test)

B, T, C = 3, 4, 29
ATOL = 1e-10


# ---------------------------------------------------------------------------------------------
# transcription of the reference modules (model/models.py)


def clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class RefEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    def forward(self, src):
        out = src
        for i in range(self.num_layers):
            out = self.layers[i](out)
        return out


class RefDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers):
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers

    def forward(self, tgt, memory):
        out = tgt
        for i in range(self.num_layers):
            out = self.layers[i](out, memory)
        return out


class RefEncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src):  # src [T, B, d]
        src = self.norm1(src + self.dropout1(self.self_attn(src, src, src)[0]))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class RefDecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)  # registered, never run
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, tgt, memory):  # [T, B, d] each
        memory = torch.cat([memory, tgt], dim=0)
        tgt = self.norm1(tgt + self.dropout1(self.multihead_attn(tgt, memory, memory)[0]))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm2(tgt + self.dropout2(tgt2))


class RefNewAudioGuidedAttention(nn.Module):
    """New_Audio_Guided_Attention (CMRAN): forward(video [B,T,7,7,512], audio [T,B,128]) -> [B,T,512]."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.affine_video_1 = nn.Linear(512, 512)
        self.affine_audio_1 = nn.Linear(128, 512)
        self.affine_bottleneck = nn.Linear(512, 256)
        self.affine_v_c_att = nn.Linear(256, 512)
        self.affine_video_2 = nn.Linear(512, 256)
        self.affine_audio_2 = nn.Linear(128, 256)
        self.affine_v_s_att = nn.Linear(256, 1)
        self.affine_video_guided_1 = nn.Linear(512, 64)  # registered, never run
        self.affine_video_guided_2 = nn.Linear(64, 128)
        self.tanh = nn.Tanh()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, video, audio):
        audio = audio.transpose(1, 0)
        batch, t_size, h, w, v_dim = video.size()
        audio_feature = audio.reshape(batch * t_size, audio.size(-1))
        visual_feature = video.reshape(batch, t_size, -1, v_dim)
        raw_visual_feature = visual_feature
        # channel attention
        audio_query_1 = self.relu(self.affine_audio_1(audio_feature)).unsqueeze(-2)
        video_query_1 = self.relu(self.affine_video_1(visual_feature)).reshape(batch * t_size, h * w, -1)
        audio_video_query = self.relu(self.affine_bottleneck((audio_query_1 * video_query_1).mean(-2)))
        channel_att_maps = self.affine_v_c_att(audio_video_query).sigmoid().reshape(batch, t_size, -1, v_dim)
        c_att_visual_feat = raw_visual_feature * (channel_att_maps + 1)
        # spatial attention
        c_att_visual_feat = c_att_visual_feat.reshape(batch * t_size, -1, v_dim)
        c_att_visual_query = self.relu(self.affine_video_2(c_att_visual_feat))
        audio_query_2 = self.relu(self.affine_audio_2(audio_feature)).unsqueeze(-2)
        spatial_att_maps = self.softmax(self.tanh(self.affine_v_s_att(c_att_visual_query * audio_query_2)).transpose(2, 1))
        self.last_spatial = spatial_att_maps.reshape(batch, t_size, -1)  # for the comparison only
        return torch.bmm(spatial_att_maps, c_att_visual_feat).squeeze().reshape(batch, t_size, v_dim)


# ---------------------------------------------------------------------------------------------
# transcription of model/main_model.py


class RefInternalTemporalRelationModule(nn.Module):
    def __init__(self, input_dim, d_model, dim_feedforward=2048):
        super().__init__()
        self.encoder_layer = RefEncoderLayer(d_model=d_model, nhead=4, dim_feedforward=dim_feedforward)
        self.encoder = RefEncoder(self.encoder_layer, num_layers=2)
        self.affine_matrix = nn.Linear(input_dim, d_model)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, feature):
        return self.encoder(self.affine_matrix(feature))


class RefCrossModalRelationAttModule(nn.Module):
    def __init__(self, input_dim, d_model, dim_feedforward=2048):
        super().__init__()
        self.decoder_layer = RefDecoderLayer(d_model=d_model, nhead=4, dim_feedforward=dim_feedforward)
        self.decoder = RefDecoder(self.decoder_layer, num_layers=1)
        self.affine_matrix = nn.Linear(input_dim, d_model)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, query_feature, memory_feature):
        return self.decoder(self.affine_matrix(query_feature), memory_feature)


class RefWeaklyLocalizationModule(nn.Module):
    def __init__(self, input_dim, num_classes=29):
        super().__init__()
        self.classifier = nn.Linear(input_dim, 1)
        self.event_classifier = nn.Linear(input_dim, num_classes)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, fused_content):
        fused_content = fused_content.transpose(0, 1)
        max_fused_content, _ = fused_content.max(1)
        is_event_scores = self.classifier(fused_content)
        raw_logits = self.event_classifier(max_fused_content)[:, None, :]
        fused_logits = is_event_scores.sigmoid() * raw_logits
        logits, _ = torch.max(fused_logits, dim=1)
        return is_event_scores.squeeze(), raw_logits.squeeze(), self.softmax(logits)


class RefSupvLocalizeModule(nn.Module):
    def __init__(self, d_model, num_classes=29):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(d_model, 1)
        self.event_classifier = nn.Linear(d_model, num_classes - 1)

    def forward(self, fused_content):
        max_fused_content, _ = fused_content.transpose(1, 0).max(1)
        return self.classifier(fused_content), self.event_classifier(max_fused_content)


class RefAudioVideoInter(nn.Module):
    def __init__(self, d_model, n_head, head_dropout=0.1):
        super().__init__()
        self.dropout = nn.Dropout(0.1)
        self.video_multihead = nn.MultiheadAttention(d_model, num_heads=n_head, dropout=head_dropout)
        self.norm1 = nn.LayerNorm(d_model)

    def forward(self, video_feat, audio_feat):
        global_feat = video_feat * audio_feat
        memory = torch.cat([audio_feat, video_feat], dim=0)
        mid_out = self.video_multihead(global_feat, memory, memory)[0]
        return self.norm1(global_feat + self.dropout(mid_out))


class RefMainModel(nn.Module):
    """supv_main_model (weak=False) / weak_main_model (weak=True)."""

    def __init__(self, weak=False, num_classes=29):
        super().__init__()
        self.spatial_channel_att = RefNewAudioGuidedAttention()
        self.v_fc = nn.Linear(512, 512)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.2)
        self.video_encoder = RefInternalTemporalRelationModule(input_dim=512, d_model=256)
        self.video_decoder = RefCrossModalRelationAttModule(input_dim=512, d_model=256)
        self.audio_encoder = RefInternalTemporalRelationModule(input_dim=128, d_model=256)
        self.audio_decoder = RefCrossModalRelationAttModule(input_dim=128, d_model=256)
        self.AVInter = RefAudioVideoInter(256, n_head=2 if weak else 4, head_dropout=0.1)
        self.localize_module = (RefWeaklyLocalizationModule(256, num_classes) if weak
                                else RefSupvLocalizeModule(256, num_classes))

    def forward(self, visual_feature, audio_feature):
        audio_feature = audio_feature.transpose(1, 0).contiguous()
        visual_feature = self.dropout(self.relu(self.v_fc(visual_feature)))
        visual_feature = self.spatial_channel_att(visual_feature, audio_feature)
        visual_feature = visual_feature.transpose(1, 0).contiguous()
        video_key_value_feature = self.video_encoder(visual_feature)
        audio_query_output = self.audio_decoder(audio_feature, video_key_value_feature)
        audio_key_value_feature = self.audio_encoder(audio_feature)
        video_query_output = self.video_decoder(visual_feature, audio_key_value_feature)
        video_query_output = self.AVInter(video_query_output, audio_query_output)
        return self.localize_module(video_query_output)


# ---------------------------------------------------------------------------------------------
# the training scripts' loss and accuracy lines


def ref_supervised_loss(is_event_scores, event_scores, labels):
    """supv_main.py train_epoch: labels [B, T, 29] one-hot (double)."""
    is_event_scores = is_event_scores.transpose(1, 0).squeeze().contiguous()
    labels_foreground = labels[:, :, :-1]
    labels_BCE, labels_evn = labels_foreground.max(-1)
    labels_event, _ = labels_evn.max(-1)
    loss_is_event = nn.BCEWithLogitsLoss()(is_event_scores, labels_BCE)
    loss_event_class = nn.CrossEntropyLoss()(event_scores, labels_event)
    return loss_is_event + loss_event_class, loss_is_event, loss_event_class


def ref_weak_loss(event_scores, video_labels):
    """weakly_main.py train_epoch: mil labels [B, 29] one-hot."""
    return nn.MultiLabelSoftMarginLoss()(event_scores, video_labels.double())


def ref_predictions(is_event_scores, event_scores):
    """compute_accuracy_supervised of both scripts, up to ``pred`` (is_event_scores [B, T])."""
    scores_pos_ind = is_event_scores.sigmoid() > 0.5
    scores_mask = scores_pos_ind == 0
    _, event_class = event_scores.max(-1)
    pred = scores_pos_ind.long()
    pred *= event_class[:, None]
    pred[scores_mask] = 28
    return pred


# ---------------------------------------------------------------------------------------------
# key map (ours -> reference) and helpers


def ours_to_reference_key(key: str) -> str:
    for module in ("video_encoder", "audio_encoder"):
        key = key.replace(f"{module}.layers.", f"{module}.encoder.layers.")
    for module in ("video_decoder", "audio_decoder"):
        key = key.replace(f"{module}.layers.", f"{module}.decoder.layers.")
    if key.startswith(("classifier.", "event_classifier.")):
        key = "localize_module." + key
    return key


def reference_only(key: str) -> bool:
    """Reference parameters that its forward never runs (not built by us)."""
    return (".encoder_layer." in key or ".decoder_layer." in key or ".self_attn." in key and "decoder" in key
            or "affine_video_guided" in key)


def load_reference_weights(ours: nn.Module, ref: nn.Module) -> None:
    ref_state = ref.state_dict()
    mapped = {k: ref_state[ours_to_reference_key(k)] for k in ours.state_dict()}
    used = sorted(ours_to_reference_key(k) for k in ours.state_dict())
    assert used == sorted(k for k in ref_state if not reference_only(k)), \
        "our layers and the reference's run layers do not correspond one to one"
    ours.load_state_dict(mapped, strict=True)


def random_inputs(seed=0, t=T):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, t, 128, generator=g, dtype=torch.float64)
    visual = torch.rand(B, t, 7, 7, 512, generator=g, dtype=torch.float64) * 2.0
    return audio, visual


def labels_batch(seed=0, t=T):
    """One event class per video on a span, background (28) elsewhere."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((B, t), C - 1, dtype=torch.long)
    video_label = torch.randint(0, C - 1, (B,), generator=g)
    for b in range(B):
        start = int(torch.randint(0, t - 1, (1,), generator=g))
        labels[b, start:start + 2] = video_label[b]
    return {"labels": labels, "video_label": video_label, "valid": torch.ones(B, t, dtype=torch.bool)}


_PAIRS: dict = {}


def build_pair(setting):
    """(ours, reference) in float64 eval mode with the same weights (built once per setting)."""
    if setting not in _PAIRS:
        torch.manual_seed(1)
        ref = RefMainModel(weak=setting == "weak").double().eval()
        torch.manual_seed(2)  # different init: parity must come from the copied weights
        ours = get_head("cmran")(C, setting).double().eval()
        load_reference_weights(ours, ref)
        _PAIRS[setting] = ours, ref
    return _PAIRS[setting]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=ATOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# relation.py layers vs the transcription


def layer_pair(ours_cls, ref_cls, *args, **kwargs):
    torch.manual_seed(3)
    ref = ref_cls(*args, **kwargs).double().eval()
    ours = ours_cls(*args, **kwargs).double().eval()
    state = ref.state_dict()
    ours.load_state_dict({k: state[k] for k in ours.state_dict()}, strict=True)
    return ours, ref


@pytest.mark.parametrize("ffn_dim", [2048, 1024])  # CMRAN / CMBS
def test_encoder_and_decoder_layers_match(ffn_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 32, generator=g, dtype=torch.float64)
    memory = torch.randn(B, T + 1, 32, generator=g, dtype=torch.float64)
    ours, ref = layer_pair(relation.EncoderLayer, RefEncoderLayer, 32, 4, ffn_dim)
    close(ours(x), ref(x.transpose(0, 1)).transpose(0, 1))
    ours, ref = layer_pair(relation.DecoderLayer, RefDecoderLayer, 32, 4, ffn_dim)
    assert {k for k in ref.state_dict() if k not in ours.state_dict()} == \
        {"self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias"}
    close(ours(x, memory), ref(x.transpose(0, 1), memory.transpose(0, 1)).transpose(0, 1))


def test_relation_modules_and_interaction_match():
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(B, T, 128, generator=g, dtype=torch.float64)
    video = torch.randn(B, T, 512, generator=g, dtype=torch.float64)
    torch.manual_seed(4)
    ref_enc = RefInternalTemporalRelationModule(128, 256).double().eval()
    ref_dec = RefCrossModalRelationAttModule(512, 256).double().eval()
    ours_enc = relation.InternalTemporalRelation(128, 256).double().eval()
    ours_dec = relation.CrossModalRelationAttention(512, 256).double().eval()
    for ours, ref, inner in ((ours_enc, ref_enc, "encoder"), (ours_dec, ref_dec, "decoder")):
        state = ref.state_dict()
        ours.load_state_dict({k: state[k.replace("layers.", f"{inner}.layers.")] for k in ours.state_dict()})
    memory = ours_enc(audio)
    close(memory, ref_enc(audio.transpose(0, 1)).transpose(0, 1))
    close(ours_dec(video, memory), ref_dec(video.transpose(0, 1), memory.transpose(0, 1)).transpose(0, 1))
    ours, ref = layer_pair(relation.AudioVisualInteraction, RefAudioVideoInter, 256, 4)
    a, v = ours_enc(audio), ours_dec(video, memory)
    close(ours(v, a), ref(v.transpose(0, 1), a.transpose(0, 1)).transpose(0, 1))


def test_agsca_matches_new_audio_guided_attention():
    torch.manual_seed(5)
    ref = RefNewAudioGuidedAttention().double().eval()
    ours = relation.AudioGuidedSpatialChannelAttention().double().eval()
    state = ref.state_dict()
    ours.load_state_dict({k: state[k] for k in ours.state_dict()}, strict=True)
    assert n_params(ref) - n_params(ours) == 41_152  # affine_video_guided_1/2
    audio, visual = random_inputs(6)
    expected = ref(visual, audio.transpose(0, 1))
    feature, weights = ours(audio, visual)
    close(feature, expected)
    close(weights, ref.last_spatial)
    # a flattened [B, T, 49, 512] map is the same input
    close(ours.attend(audio, visual.flatten(2, 3))[0], expected)
    # the composable parts: channel_attend, spatial_weights, then the weighted sum
    attended = ours.channel_attend(audio, visual)
    close(torch.einsum("btr,btrd->btd", ours.spatial_weights(audio, attended), attended), expected)


def test_agsca_channel_query_reads_one_map_and_weights_the_other():
    """CMBS / CACE-Net: the channel weights come from their self-attended map Q, but multiply the raw map V."""
    torch.manual_seed(7)
    ours = relation.AudioGuidedSpatialChannelAttention().double()
    audio, visual = random_inputs(8)
    query = torch.randn_like(visual)
    w_c = ours.channel_weights(audio, query)
    attended_map = visual.flatten(2, 3) * (w_c.unsqueeze(-2) + 1)
    close(ours.channel_attend(audio, visual, channel_query=query), attended_map)
    w_s = ours.spatial_weights(audio, attended_map)
    feature, weights = ours.attend(audio, visual, channel_query=query)
    close(weights, w_s)
    close(feature, torch.einsum("btr,btrd->btd", w_s, attended_map))
    assert not torch.allclose(feature, ours.attend(audio, visual)[0])


# ---------------------------------------------------------------------------------------------
# the head vs supv_main_model / weak_main_model

REF_REGISTERED = {"supervised": 15_863_262, "weak": 15_863_519}
OURS_USED = {"supervised": 9_509_150, "weak": 9_509_407}


@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_parameter_counts(setting):
    ours, ref = build_pair(setting)
    assert n_params(ref) == REF_REGISTERED[setting]
    assert n_params(ours) == OURS_USED[setting]
    idle = sum(p.numel() for k, p in ref.named_parameters() if reference_only(k))
    assert idle == 2 * 1_315_072 + 2 * 1_578_240 + 2 * 263_168 + 41_152
    assert n_params(ours) == n_params(ref) - idle


def test_docstrings_record_the_counts():
    import train.heads.cmran as module

    for count in (*REF_REGISTERED.values(), *OURS_USED.values()):
        text = f"{count:,}"
        assert text in module.__doc__ and text in CMRANHead.__doc__, text


def check_predictions(ours, out, is_event_ref, event_ref):
    """Our predict and the argmax of our scores = the reference rule, on the outputs and on outputs
    whose is-event logits are shifted (so that both branches of the rule occur)."""
    seen = set()
    for shift in (0.0, -0.25, 0.25):
        shifted = out.extras["is_event_scores"] + shift
        mine = type(out)(ours.segment_scores(shifted, out.extras["event_scores"]),
                         {**out.extras, "is_event_scores": shifted})
        pred_ref = ref_predictions(is_event_ref + shift, event_ref)
        assert torch.equal(ours.predict(mine), pred_ref)
        assert torch.equal(mine.scores.argmax(-1), pred_ref)
        if shift == 0.0:
            assert torch.equal(mine.scores, out.scores)
        seen |= set(pred_ref.flatten().tolist())
    assert C - 1 in seen and len(seen) >= 2, seen  # background and event classes


def test_supervised_outputs_loss_and_predictions_match():
    ours, ref = build_pair("supervised")
    audio, visual = random_inputs(10)
    batch = labels_batch(11)
    with torch.no_grad():
        is_event_ref, event_ref = ref(visual, audio)  # [T, B, 1], [B, 28]
        out = ours(audio, visual)
    close(out.extras["is_event_scores"], is_event_ref.transpose(0, 1).squeeze(-1))
    close(out.extras["event_scores"], event_ref)
    close(out.spatial.reshape(B, T, 49), ref.spatial_channel_att.last_spatial)
    # loss: supv_main.py l. 149-158 with the one-hot [B, T, 29] labels of labels.h5
    onehot = F.one_hot(batch["labels"], C).double()
    total, bce, ce = ref_supervised_loss(is_event_ref, event_ref, onehot)
    got, terms = split_loss(ours.loss(out, batch))
    close(got, total)
    close(terms["is_event"], bce)
    close(terms["event"], ce)
    # prediction: compute_accuracy_supervised
    check_predictions(ours, out, is_event_ref.transpose(1, 0).squeeze(), event_ref)


def test_supervised_predictions_cover_both_branches():
    """The prediction rule on hand-set scores: one segment above, one below 0.5, one exactly at 0.5."""
    head = get_head("cmran")(C, "supervised")
    is_event = torch.tensor([[2.0, -1.0, 0.0]])
    event = torch.zeros(1, C - 1)
    event[0, 7] = 3.0
    out = type("Out", (), {"extras": {"is_event_scores": is_event, "event_scores": event}})()
    assert torch.equal(head.predict(out), ref_predictions(is_event, event))
    assert head.predict(out).tolist() == [[7, 28, 28]]


def test_weak_outputs_loss_and_predictions_match():
    ours, ref = build_pair("weak")
    audio, visual = random_inputs(12)
    video_label = torch.tensor([3, 28, 17])  # mil_labels.h5 / labels_noisy.h5: background = 28
    batch = {**labels_batch(13), "video_label": video_label}
    with torch.no_grad():
        is_event_ref, raw_ref, event_scores_ref = ref(visual, audio)  # [B, T], [B, 29], [B, 29]
        out = ours(audio, visual)
    close(out.extras["is_event_scores"], is_event_ref)
    close(out.extras["event_scores"], raw_ref)
    close(ours.video_probabilities(out), event_scores_ref)
    close(out.spatial.reshape(B, T, 49), ref.spatial_channel_att.last_spatial)
    expected = ref_weak_loss(event_scores_ref, F.one_hot(video_label, C))
    for pool in ("mean", "max"):  # the reference's max pooling, whatever the trainer asks
        close(split_loss(ours.loss(out, batch, weak_pool=pool))[0], expected)
    # weakly_main.py validate_epoch: compute_accuracy_supervised(is_event_scores, raw_logits, labels)
    check_predictions(ours, out, is_event_ref, raw_ref)


def test_weak_prediction_with_background_as_best_class():
    """Weak raw logits cover all 29 classes: a confident segment whose best class is background
    stays background, in predict and in the scores' argmax."""
    head = get_head("cmran")(C, "weak")
    is_event = torch.tensor([[2.0, -1.0]])
    event = torch.zeros(1, C)
    event[0, C - 1] = 3.0
    scores = head.segment_scores(is_event, event)
    out = type("Out", (), {"extras": {"is_event_scores": is_event, "event_scores": event}})()
    assert head.predict(out).tolist() == [[28, 28]] == ref_predictions(is_event, event).tolist()
    assert scores.argmax(-1).tolist() == [[28, 28]]


@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_gradients_match(setting):
    """Same loss, same weights -> same gradient for every parameter we build."""
    ours, ref = build_pair(setting)
    audio, visual = random_inputs(14)
    batch = labels_batch(15)
    ours.zero_grad()
    ref.zero_grad()
    if setting == "supervised":
        ref_supervised_loss(*ref(visual, audio), F.one_hot(batch["labels"], C).double())[0].backward()
    else:
        ref_weak_loss(ref(visual, audio)[2], F.one_hot(batch["video_label"], C)).backward()
    split_loss(ours.loss(ours(audio, visual), batch))[0].backward()
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[ours_to_reference_key(key)].grad, rtol=1e-8, atol=1e-12)
    ours.zero_grad()
    ref.zero_grad()


def test_padded_segments_are_left_out_of_the_loss():
    """valid False segments: out of the BCE mean, the class target and the weak max pooling."""
    for setting in ("supervised", "weak"):
        ours, _ = build_pair(setting)
        audio, visual = random_inputs(16)
        batch = labels_batch(17)
        with torch.no_grad():
            out = ours(audio, visual)
        padded = {**batch, "valid": batch["valid"].clone(), "labels": batch["labels"].clone()}
        padded["valid"][:, -1] = False
        base = split_loss(ours.loss(out, padded))[0]
        padded["labels"][:, -1] = 5  # whatever a padded segment carries
        changed_out = type(out)(out.scores, {**out.extras, "is_event_scores": out.extras["is_event_scores"].clone()})
        changed_out.extras["is_event_scores"][:, -1] = 50.0
        close(split_loss(ours.loss(changed_out, padded))[0], base)


def test_any_number_of_segments():
    for setting in ("supervised", "weak"):
        cls = get_head("cmran")
        head = cls(C, setting, cls.make_config({"d": 16, "ffn_dim": 32, "att_dim": 16, "visual_fc_dim": 64})).eval()
        for t in (2, 10):
            audio, visual = random_inputs(18, t)
            out = head(audio.float(), visual.float())
            assert out.scores.shape == (B, t, C) and out.spatial.shape == (B, t, 7, 7)


def test_schedules_follow_the_scripts():
    sup, weak = CMRANHead.train_defaults, CMRANHead.weak_train_defaults
    assert (sup["lr"], sup["batch_size"], sup["epochs"], sup["grad_clip"]) == (5e-4, 32, 200, 0.1)
    assert (weak["lr"], weak["batch_size"], weak["epochs"], weak["grad_clip"]) == (5e-4, 32, 200, 0.5)
    assert tuple(sup["milestones"]) == (10, 20, 30) and tuple(weak["milestones"]) == (5, 20, 40)
    assert sup["lr_gamma"] == weak["lr_gamma"] == 0.5
    assert sup["weight_decay"] == weak["weight_decay"] == 0.0 and sup["lr_step"] is weak["lr_step"] is None
    assert CMRANHead(C, "weak").weak_pooling("mean") == "max"
