"""Parity of the ``cmbs`` head with the public reference code marmot-xy/CMBS.

The reference side is rebuilt here from the published definitions (``model/models.py``: Encoder,
Decoder, EncoderLayer, DecoderLayer, New_Audio_Guided_Attention; ``model/main_model.py``: RNNEncoder,
InternalTemporalRelationModule, CrossModalRelationAttModule, CAS_Module, SupvLocalizeModule,
AudioVideoInter, supv_main_model, weak_main_model; the loss lines of ``supv_main.py`` /
``weakly_main.py`` and their ``compute_accuracy_supervised``): same layer names, registration order
and forward order, on CPU in float64 (the original moves the attention to CUDA). T is taken from the
inputs (nothing in these models hard-codes 10 except the top-4 pooling, kept). Identical weights are
loaded into both sides through an explicit state-dict key map and the outputs, losses, predictions and
gradients are compared. The reference registers layers its forward never runs; they are listed in
:data:`IDLE_SUPERVISED` / :data:`IDLE_WEAK`, counted, and shown to receive no gradient.

The CACE-Net reference (Brain-Cog-Lab/CACE-Net, ``CACE/model``) shares these block definitions line
for line; tests/test_cace_parity.py imports them from here.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from train.registry import get_head

torch.set_num_threads(1)  # small tensors: one thread is fastest (no spin-waiting on a busy machine)

B, T, C = 2, 10, 29

#: configs/main.json and configs/weak.json
MAIN_JSON = {"name": "supv_main_model", "video_inputdim": 512, "audio_inputdim": 128, "d_model": 256,
             "alpha": 0.1, "gamma": 0.3, "beta": 0.4}
WEAK_JSON = {"name": "weak_main_model", "video_inputdim": 512, "audio_inputdim": 128, "d_model": 256,
             "alpha": 0.2, "gamma": 0.5, "beta": 0.5}


# ---------------------------------------------------------------------------------------------
# transcription of the reference blocks (model/models.py)


def ref_clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class RefEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = ref_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src):
        output = src
        for i in range(self.num_layers):
            output = self.layers[i](output)
        if self.norm:
            output = self.norm(output)
        return output


class RefDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = ref_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt, memory):
        output = tgt
        for i in range(self.num_layers):
            output = self.layers[i](output, memory)
        if self.norm:
            output = self.norm(output)
        return output


class RefEncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=1024, dropout=0.1):
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
        src2 = self.self_attn(src, src, src)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class RefDecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=1024, dropout=0.1):
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

    def forward(self, tgt, memory):  # [T, B, d]
        memory = torch.cat([memory, tgt], dim=0)
        tgt2 = self.multihead_attn(tgt, memory, memory)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm2(tgt + self.dropout2(tgt2))


class RefNewAudioGuidedAttention(nn.Module):
    """CMBS ``New_Audio_Guided_Attention(beta)``; records its spatial maps in ``last_spatial``."""

    def __init__(self, beta):
        super().__init__()
        self.beta = beta
        self.relu = nn.ReLU()
        self.video_input_dim = 512
        self.audio_input_dim = 128
        self.hidden_dim = 256
        self.affine_video_1 = nn.Linear(self.video_input_dim, self.video_input_dim)
        self.affine_audio_1 = nn.Linear(self.audio_input_dim, self.video_input_dim)
        self.affine_bottleneck = nn.Linear(self.video_input_dim, self.hidden_dim)
        self.affine_v_c_att = nn.Linear(self.hidden_dim, self.video_input_dim)
        self.affine_video_2 = nn.Linear(self.video_input_dim, self.hidden_dim)
        self.affine_audio_2 = nn.Linear(self.audio_input_dim, self.hidden_dim)
        self.affine_v_s_att = nn.Linear(self.hidden_dim, 1)
        self.latent_dim = 4
        self.video_query = nn.Linear(self.video_input_dim, self.video_input_dim // self.latent_dim)
        self.video_key = nn.Linear(self.video_input_dim, self.video_input_dim // self.latent_dim)
        self.video_value = nn.Linear(self.video_input_dim, self.video_input_dim)
        self.affine_video_ave = nn.Linear(self.video_input_dim, self.hidden_dim)
        self.affine_video_3 = nn.Linear(self.video_input_dim, self.hidden_dim)
        self.ave_bottleneck = nn.Linear(512, 256)  # registered, never run
        self.ave_v_att = nn.Linear(self.hidden_dim, 1)
        self.tanh = nn.Tanh()
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.2)
        self.norm = nn.LayerNorm(self.video_input_dim)

    def forward(self, video, audio):  # video [B, T, 7, 7, 512], audio [T, B, 128]
        audio = audio.transpose(1, 0)
        batch, t_size, h, w, v_dim = video.size()
        a_dim = audio.size(-1)
        audio_feature = audio.reshape(batch * t_size, a_dim)
        visual_feature = video.reshape(batch, t_size, -1, v_dim)
        raw_visual_feature = visual_feature
        # self attention over the regions
        video_query_feature = self.video_query(visual_feature).reshape(batch * t_size, h * w, -1)
        video_key_feature = self.video_key(visual_feature).reshape(batch * t_size, h * w, -1).permute(0, 2, 1)
        energy = torch.bmm(video_query_feature, video_key_feature)
        attention = self.softmax(energy)
        video_value_feature = self.video_value(visual_feature).reshape(batch * t_size, h * w, -1)
        output = torch.matmul(attention, video_value_feature)
        output = self.norm(visual_feature.reshape(batch * t_size, h * w, -1) + self.dropout(output))
        visual_feature = output
        # video spatial attention
        video_average = visual_feature.sum(dim=1) / (h * w)
        video_average = video_average.reshape(batch * t_size, v_dim)
        video_average = self.relu(self.affine_video_ave(video_average)).unsqueeze(-2)
        self_video_att_feat = visual_feature.reshape(batch * t_size, -1, v_dim)
        self_video_att_query = self.relu(self.affine_video_3(self_video_att_feat))
        self_query = self_video_att_query * video_average
        self_spatial_att_maps = self.softmax(self.tanh(self.ave_v_att(self_query)).transpose(2, 1))
        self_att_feat = torch.bmm(self_spatial_att_maps, visual_feature).squeeze().reshape(batch, t_size, v_dim)
        # channel attention
        audio_query_1 = self.relu(self.affine_audio_1(audio_feature)).unsqueeze(-2)
        video_query_1 = self.relu(self.affine_video_1(visual_feature)).reshape(batch * t_size, h * w, -1)
        audio_video_query_raw = (audio_query_1 * video_query_1).mean(-2)
        audio_video_query = self.relu(self.affine_bottleneck(audio_video_query_raw))
        channel_att_maps = self.affine_v_c_att(audio_video_query).sigmoid().reshape(batch, t_size, -1, v_dim)
        c_att_visual_feat = raw_visual_feature * (channel_att_maps + 1)
        # audio spatial attention
        c_att_visual_feat = c_att_visual_feat.reshape(batch * t_size, -1, v_dim)
        c_att_visual_query = self.relu(self.affine_video_2(c_att_visual_feat))
        audio_query_2 = self.relu(self.affine_audio_2(audio_feature)).unsqueeze(-2)
        audio_video_query_2 = c_att_visual_query * audio_query_2
        spatial_att_maps = self.softmax(self.tanh(self.affine_v_s_att(audio_video_query_2)).transpose(2, 1))
        c_s_att_visual_feat = torch.bmm(spatial_att_maps, c_att_visual_feat).squeeze().reshape(batch, t_size, v_dim)
        c_s_att_visual_feat = c_s_att_visual_feat + self.beta * self_att_feat.sigmoid() * c_s_att_visual_feat
        self.last_spatial = spatial_att_maps.reshape(batch, t_size, h, w)
        self.last_global = self_spatial_att_maps.reshape(batch, t_size, h, w)
        return c_s_att_visual_feat


# ---------------------------------------------------------------------------------------------
# transcription of the reference modules (model/main_model.py)


class RefRNNEncoder(nn.Module):
    def __init__(self, audio_dim, video_dim, d_model, num_layers):
        super().__init__()
        self.d_model = d_model
        with warnings.catch_warnings():  # dropout=0.2 on a one-layer LSTM: PyTorch warns, it does nothing
            warnings.simplefilter("ignore", UserWarning)
            self.audio_rnn = nn.LSTM(audio_dim, int(d_model / 2), num_layers=num_layers, batch_first=True,
                                     bidirectional=True, dropout=0.2)
            self.visual_rnn = nn.LSTM(video_dim, d_model, num_layers=num_layers, batch_first=True,
                                      bidirectional=True, dropout=0.2)

    def forward(self, audio_feature, visual_feature):
        audio_output, _ = self.audio_rnn(audio_feature)
        video_output, _ = self.visual_rnn(visual_feature)
        return audio_output, video_output


class RefInternalTemporalRelationModule(nn.Module):
    def __init__(self, input_dim, d_model, feedforward_dim):
        super().__init__()
        self.encoder_layer = RefEncoderLayer(d_model=d_model, nhead=4, dim_feedforward=feedforward_dim)
        self.encoder = RefEncoder(self.encoder_layer, num_layers=2)
        self.affine_matrix = nn.Linear(input_dim, d_model)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, feature):
        return self.encoder(self.affine_matrix(feature))


class RefCrossModalRelationAttModule(nn.Module):
    def __init__(self, input_dim, d_model, feedforward_dim):
        super().__init__()
        self.decoder_layer = RefDecoderLayer(d_model=d_model, nhead=4, dim_feedforward=feedforward_dim)
        self.decoder = RefDecoder(self.decoder_layer, num_layers=1)
        self.affine_matrix = nn.Linear(input_dim, d_model)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, query_feature, memory_feature):
        return self.decoder(self.affine_matrix(query_feature), memory_feature)


class RefCASModule(nn.Module):
    def __init__(self, d_model, num_class=28):
        super().__init__()
        self.d_model = d_model
        self.num_class = num_class
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Sequential(nn.Conv1d(d_model, self.num_class + 1, kernel_size=1, stride=1, padding=0,
                                                  bias=False))

    def forward(self, content):
        return self.classifier(content.permute(0, 2, 1)).permute(0, 2, 1)


class RefSupvLocalizeModule(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(d_model, 1)
        self.event_classifier = nn.Linear(d_model, 28)

    def forward(self, fused_content):
        max_fused_content, _ = fused_content.transpose(1, 0).max(1)
        logits = self.classifier(fused_content)
        class_logits = self.event_classifier(max_fused_content)
        return logits, class_logits


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


def ref_top4(cas):
    """``sorted_scores, _ = x.sort(descending=True, dim=1); torch.mean(sorted_scores[:, :4, :], dim=1)``."""
    sorted_scores, _ = cas.sort(descending=True, dim=1)
    return torch.mean(sorted_scores[:, :4, :], dim=1)


class RefWeakMainModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.beta = config["beta"]
        self.alpha = config["alpha"]
        self.gamma = config["gamma"]
        self.spatial_channel_att = RefNewAudioGuidedAttention(self.beta)
        self.video_input_dim = config["video_inputdim"]
        self.video_fc_dim = config["video_inputdim"]
        self.d_model = config["d_model"]
        self.audio_input_dim = config["audio_inputdim"]
        self.v_fc = nn.Linear(self.video_input_dim, self.video_fc_dim)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.1)
        self.video_encoder = RefInternalTemporalRelationModule(self.video_fc_dim, self.d_model, 2048)
        self.video_decoder = RefCrossModalRelationAttModule(self.video_fc_dim, self.d_model, 1024)
        self.audio_encoder = RefInternalTemporalRelationModule(self.audio_input_dim, self.d_model, 2048)
        self.audio_decoder = RefCrossModalRelationAttModule(self.audio_input_dim, self.d_model, 1024)
        self.AVInter = RefAudioVideoInter(self.d_model, n_head=2, head_dropout=0.2)
        self.VAInter = RefAudioVideoInter(self.d_model, n_head=2, head_dropout=0.2)
        self.audio_gated = nn.Sequential(nn.Linear(self.d_model, 1), nn.Sigmoid())
        self.video_gated = nn.Sequential(nn.Linear(self.d_model, 1), nn.Sigmoid())
        self.CAS_model = RefCASModule(d_model=self.d_model, num_class=28)
        self.classifier = nn.Linear(self.d_model, 1)  # registered, never run
        self.softmax = nn.Softmax(dim=-1)
        self.audio_cas = nn.Linear(self.d_model, 29)
        self.video_cas = nn.Linear(self.d_model, 29)

    def forward(self, visual_feature, audio_feature):
        audio_feature = audio_feature.transpose(1, 0).contiguous()
        visual_feature = self.dropout(self.relu(self.v_fc(visual_feature)))
        visual_feature = self.spatial_channel_att(visual_feature, audio_feature)
        visual_feature = visual_feature.transpose(1, 0).contiguous()
        video_key_value_feature = self.video_encoder(visual_feature)
        audio_query_output = self.audio_decoder(audio_feature, video_key_value_feature)
        audio_key_value_feature = self.audio_encoder(audio_feature)
        video_query_output = self.video_decoder(visual_feature, audio_key_value_feature)
        audio_gate = self.audio_gated(video_key_value_feature)
        video_gate = self.video_gated(audio_key_value_feature)
        av_gate = (audio_gate + video_gate) / 2
        av_gate = av_gate.permute(1, 0, 2)
        video_query_output = (1 - self.alpha) * video_query_output + audio_gate * video_query_output * self.alpha
        audio_query_output = (1 - self.alpha) * audio_query_output + video_gate * audio_query_output * self.alpha
        video_cas = self.video_cas(video_query_output).permute(1, 0, 2)
        audio_cas = self.audio_cas(audio_query_output).permute(1, 0, 2)
        video_cas_gate = video_cas.sigmoid()
        audio_cas_gate = audio_cas.sigmoid()
        video_query_output = self.AVInter(video_query_output, audio_query_output)
        audio_query_output = self.VAInter(audio_query_output, video_query_output)
        fused_content = ((video_query_output + audio_query_output) / 2).transpose(0, 1)
        cas_score = self.CAS_model(fused_content)
        cas_score = self.gamma * video_cas_gate * cas_score + self.gamma * audio_cas_gate * cas_score
        raw_logits = ref_top4(cas_score)[:, None, :]
        fused_logits = av_gate * raw_logits
        logits, _ = torch.max(fused_logits, dim=1)
        event_scores = self.softmax(logits)
        return av_gate.squeeze(), raw_logits.squeeze(), event_scores


class RefSupvMainModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.beta = config["beta"]
        self.spatial_channel_att = RefNewAudioGuidedAttention(self.beta)
        self.video_input_dim = config["video_inputdim"]
        self.audio_input_dim = config["audio_inputdim"]
        self.video_fc_dim = 512
        self.d_model = config["d_model"]
        self.v_fc = nn.Linear(self.video_input_dim, self.video_fc_dim)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.2)
        self.video_encoder = RefInternalTemporalRelationModule(self.video_input_dim, self.d_model, 1024)
        self.video_decoder = RefCrossModalRelationAttModule(self.video_input_dim, self.d_model, 1024)
        self.audio_encoder = RefInternalTemporalRelationModule(self.d_model, self.d_model, 1024)
        self.audio_decoder = RefCrossModalRelationAttModule(self.d_model, self.d_model, 1024)
        self.audio_visual_rnn_layer = RefRNNEncoder(self.audio_input_dim, self.video_input_dim, self.d_model, 1)
        self.audio_gated = nn.Sequential(nn.Linear(self.d_model, 1), nn.Sigmoid())
        self.video_gated = nn.Sequential(nn.Linear(self.d_model, 1), nn.Sigmoid())
        self.AVInter = RefAudioVideoInter(self.d_model, n_head=4, head_dropout=0.2)
        self.VAInter = RefAudioVideoInter(self.d_model, n_head=4, head_dropout=0.2)
        self.localize_module = RefSupvLocalizeModule(self.d_model)
        self.video_norm = nn.LayerNorm(self.d_model)  # registered, never run
        self.audio_norm = nn.LayerNorm(self.d_model)  # registered, never run
        self.audio_cas = nn.Linear(self.d_model, 28)
        self.video_cas = nn.Linear(self.d_model, 28)
        self.alpha = config["alpha"]
        self.gamma = config["gamma"]

    def forward(self, visual_feature, audio_feature):
        audio_rnn_input = audio_feature
        audio_feature = audio_feature.transpose(1, 0).contiguous()
        visual_feature = self.dropout(self.relu(self.v_fc(visual_feature)))
        visual_feature = self.spatial_channel_att(visual_feature, audio_feature)
        visual_rnn_input = visual_feature
        audio_rnn_output1, visual_rnn_output1 = self.audio_visual_rnn_layer(audio_rnn_input, visual_rnn_input)
        audio_encoder_input1 = audio_rnn_output1.transpose(1, 0).contiguous()
        visual_encoder_input1 = visual_rnn_output1.transpose(1, 0).contiguous()
        video_key_value_feature = self.video_encoder(visual_encoder_input1)
        audio_query_output = self.audio_decoder(audio_encoder_input1, video_key_value_feature)
        audio_key_value_feature = self.audio_encoder(audio_encoder_input1)
        video_query_output = self.video_decoder(visual_encoder_input1, audio_key_value_feature)
        audio_gate = self.audio_gated(audio_key_value_feature)
        video_gate = self.video_gated(video_key_value_feature)
        audio_visual_gate = audio_gate * video_gate
        video_query_output = video_query_output + audio_gate * video_query_output * self.alpha
        audio_query_output = audio_query_output + video_gate * audio_query_output * self.alpha
        video_cas = self.video_cas(video_query_output).permute(1, 0, 2)
        audio_cas = self.audio_cas(audio_query_output).permute(1, 0, 2)
        av_score = (ref_top4(video_cas) + ref_top4(audio_cas)) / 2
        video_query_output = self.AVInter(video_query_output, audio_query_output)
        audio_query_output = self.VAInter(audio_query_output, video_query_output)
        is_event_scores, event_scores = self.localize_module((video_query_output + audio_query_output) / 2)
        event_scores = event_scores + self.gamma * av_score
        return is_event_scores, event_scores, audio_visual_gate, av_score


# ---------------------------------------------------------------------------------------------
# transcription of the training scripts' loss and accuracy lines


def ref_supervised_loss(is_event_scores, event_scores, audio_visual_gate, av_score, labels):
    """supv_main.py train_epoch: labels [B, T, 29] one-hot (28 = background). Returns (loss, terms)."""
    criterion = nn.BCEWithLogitsLoss()
    criterion_event = nn.CrossEntropyLoss()
    is_event_scores = is_event_scores.transpose(1, 0).squeeze().contiguous()
    audio_visual_gate = audio_visual_gate.transpose(1, 0).squeeze().contiguous()
    labels_foreground = labels[:, :, :-1]
    labels_BCE, labels_evn = labels_foreground.max(-1)
    labels_event, _ = labels_evn.max(-1)
    loss_is_event = criterion(is_event_scores, labels_BCE)
    label_is_gate = criterion(audio_visual_gate, labels_BCE)
    loss_cas = criterion_event(av_score, labels_event)
    loss_event_class = criterion_event(event_scores, labels_event)
    loss = loss_is_event + label_is_gate + loss_event_class + loss_cas
    return loss, {"is_event": loss_is_event, "gate": label_is_gate, "event": loss_event_class, "cas": loss_cas}


def ref_predictions(is_event_scores, event_scores):
    """``compute_accuracy_supervised`` up to ``pred`` (is_event_scores [B, T], after the scripts'
    transpose / squeeze)."""
    is_event_scores = is_event_scores.sigmoid()
    scores_pos_ind = is_event_scores > 0.5
    scores_mask = scores_pos_ind == 0
    _, event_class = event_scores.max(-1)
    pred = scores_pos_ind.long()
    pred *= event_class[:, None]
    pred[scores_mask] = 28
    return pred


def ref_accuracy(pred, labels):
    _, targets = labels.max(-1)
    correct = pred.eq(targets)
    return correct.sum().double() * (100. / correct.numel())


# ---------------------------------------------------------------------------------------------
# key map (ours -> reference) and the layers only the reference has


def ours_to_reference_key(key: str) -> str:
    for stack, inner in (("video_encoder", "encoder"), ("audio_encoder", "encoder"),
                         ("video_decoder", "decoder"), ("audio_decoder", "decoder")):
        if key.startswith(f"{stack}.layers."):
            return f"{stack}.{inner}.layers.{key[len(stack) + len('.layers.'):]}"
    if key == "cas_classifier.weight":
        return "CAS_model.classifier.0.weight"  # Conv1d(d, C, 1) weight [C, d, 1] = Linear weight [C, d]
    return key


#: reference parameters (by prefix) that its forward never runs
IDLE_COMMON = ("spatial_channel_att.ave_bottleneck.", "video_encoder.encoder_layer.", "audio_encoder.encoder_layer.",
               "video_decoder.decoder_layer.", "audio_decoder.decoder_layer.",
               "video_decoder.decoder.layers.0.self_attn.", "audio_decoder.decoder.layers.0.self_attn.")
IDLE_SUPERVISED = IDLE_COMMON + ("video_norm.", "audio_norm.")
IDLE_WEAK = IDLE_COMMON + ("classifier.",)


def load_reference_weights(ours: nn.Module, ref: nn.Module, idle: tuple[str, ...]) -> None:
    """Copy ref's weights into ours through :func:`ours_to_reference_key`; every reference parameter is
    either mapped or idle, and no idle one is mapped."""
    ref_state = ref.state_dict()
    ref_state = {k: v for k, v in ref_state.items() if "num_batches" not in k}
    mapped = {k: ref_state[ours_to_reference_key(k)].reshape(v.shape) for k, v in ours.state_dict().items()}
    used = {ours_to_reference_key(k) for k in ours.state_dict()}
    idle_keys = {k for k in ref_state if k.startswith(idle)}
    assert not used & idle_keys, sorted(used & idle_keys)
    assert used | idle_keys == set(ref_state), sorted(set(ref_state) - used - idle_keys)
    ours.load_state_dict(mapped, strict=True)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# fixtures


def random_inputs(seed, t=T):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, t, 128, generator=g, dtype=torch.float64)
    visual = torch.rand(B, t, 7, 7, 512, generator=g, dtype=torch.float64) * 2.0
    return audio, visual


def balance_is_event(ref, audio, visual, bias) -> None:
    """Shift a reference is-event bias so that about half of the segments are events (non-degenerate
    prediction comparisons with random weights)."""
    with torch.no_grad():
        scores = ref(visual, audio)[0].flatten()
        bias -= scores.quantile(0.5)  # between the two middle values: no logit lands on 0


def build_pair(setting):
    torch.manual_seed(1)
    ref = (RefSupvMainModel(MAIN_JSON) if setting == "supervised" else RefWeakMainModel(WEAK_JSON)).double().eval()
    if setting == "supervised":
        audio, visual = random_inputs(3)  # the inputs of the prediction test
        balance_is_event(ref, audio, visual, ref.localize_module.classifier.bias.data)
    torch.manual_seed(2)  # different init: parity must come from the copied weights
    ours = get_head("cmbs")(C, setting).double().eval()
    load_reference_weights(ours, ref, IDLE_SUPERVISED if setting == "supervised" else IDLE_WEAK)
    return ours, ref


@pytest.fixture(scope="module")
def supervised_pair():
    return build_pair("supervised")


@pytest.fixture(scope="module")
def weak_pair():
    return build_pair("weak")


def segment_labels(seed, t=T):
    """AVE-like labels: each video has one event class on a contiguous span, background (28) elsewhere."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((B, t), C - 1, dtype=torch.long)
    video_label = torch.randint(0, C - 1, (B,), generator=g)
    for b in range(B):
        start = int(torch.randint(0, t - 2, (1,), generator=g))
        labels[b, start:start + 3] = video_label[b]
    return labels, video_label


def one_hot(labels):
    return F.one_hot(labels, C).to(torch.float64)


# ---------------------------------------------------------------------------------------------
# tests


REF_SUPERVISED_PARAMS = 13_544_537  # supv_main_model(configs/main.json), C = 29
REF_WEAK_PARAMS = 14_789_439  # weak_main_model(configs/weak.json)
OURS_SUPERVISED_PARAMS = 9_200_473
OURS_WEAK_PARAMS = 9_395_518


def test_parameter_counts(supervised_pair, weak_pair):
    ours, ref = supervised_pair
    assert n_params(ref) == REF_SUPERVISED_PARAMS
    assert n_params(ours) == OURS_SUPERVISED_PARAMS
    idle = sum(p.numel() for k, p in ref.named_parameters() if k.startswith(IDLE_SUPERVISED))
    assert REF_SUPERVISED_PARAMS - idle == OURS_SUPERVISED_PARAMS
    ours, ref = weak_pair
    assert n_params(ref) == REF_WEAK_PARAMS
    assert n_params(ours) == OURS_WEAK_PARAMS
    idle = sum(p.numel() for k, p in ref.named_parameters() if k.startswith(IDLE_WEAK))
    assert REF_WEAK_PARAMS - idle == OURS_WEAK_PARAMS


@pytest.mark.parametrize("t", [T, 3])  # 3 < top-4: the top-k pooling takes every segment
def test_supervised_outputs_match(supervised_pair, t):
    ours, ref = supervised_pair
    audio, visual = random_inputs(10 + t, t)
    with torch.no_grad():
        is_event, event, gate, av_score = ref(visual, audio)
        out = ours(audio, visual)
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.extras["is_event_scores"], is_event.transpose(0, 1).squeeze(-1), **close)
    torch.testing.assert_close(out.extras["event_scores"], event, **close)
    torch.testing.assert_close(out.extras["gate"], gate.transpose(0, 1).squeeze(-1), **close)
    torch.testing.assert_close(out.extras["cas_scores"], av_score, **close)
    torch.testing.assert_close(out.spatial, ref.spatial_channel_att.last_spatial, **close)
    torch.testing.assert_close(out.extras["global_attention"], ref.spatial_channel_att.last_global, **close)


def test_supervised_loss_predictions_and_gradients_match(supervised_pair):
    ours, ref = supervised_pair
    audio, visual = random_inputs(3)
    labels, video_label = segment_labels(3)
    batch = {"labels": labels, "video_label": video_label, "valid": torch.ones(B, T, dtype=torch.bool)}
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    ref_out = ref(visual, audio)
    expected, expected_terms = ref_supervised_loss(*ref_out, one_hot(labels))
    out = ours(audio, visual)
    got = ours.loss(out, batch)
    torch.testing.assert_close(got["loss"], expected, rtol=1e-10, atol=1e-12)
    for name, term in expected_terms.items():
        torch.testing.assert_close(got[name], term, rtol=1e-10, atol=1e-12)
    # compute_accuracy_supervised's rule
    pred = ref_predictions(ref_out[0].transpose(1, 0).squeeze(), ref_out[1])
    assert torch.equal(ours.predict(out), pred)
    assert 0 < int((pred == C - 1).sum()) < pred.numel()  # both events and background predicted
    assert torch.equal(out.scores.argmax(-1), pred)  # the scores' argmax is the same rule
    torch.testing.assert_close(ref_accuracy(ours.predict(out), one_hot(labels)), ref_accuracy(pred, one_hot(labels)))
    # same loss, same weights -> same gradients; the idle reference layers get none
    expected.backward()
    got["loss"].backward()
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        ref_grad = ref_params[ours_to_reference_key(key)].grad
        assert p.grad is not None and p.grad.abs().sum() > 0, key
        torch.testing.assert_close(p.grad, ref_grad.reshape(p.shape), rtol=1e-7, atol=1e-11)
    assert all(p.grad is None for k, p in ref_params.items() if k.startswith(IDLE_SUPERVISED))
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def test_supervised_loss_skips_invalid_segments_and_background_videos(supervised_pair):
    ours, _ = supervised_pair
    audio, visual = random_inputs(4)
    labels, video_label = segment_labels(4)
    with torch.no_grad():
        out = ours(audio, visual)
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, 6:] = False
        masked = ours.loss(out, {"labels": labels, "video_label": video_label, "valid": valid})
        bce = F.binary_cross_entropy_with_logits(out.extras["is_event_scores"], (labels != C - 1).double(),
                                                 reduction="none")
        torch.testing.assert_close(masked["is_event"], (bce[0].sum() + bce[1, :6].sum()) / (T + 6))
        # a background-only video adds nothing to the two cross-entropy terms
        labels2, video2 = labels.clone(), video_label.clone()
        labels2[1], video2[1] = C - 1, C - 1
        both = ours.loss(out, {"labels": labels2, "video_label": video2})
        alone = F.cross_entropy(out.extras["event_scores"][:1], video_label[:1])
        torch.testing.assert_close(both["event"], alone)


@pytest.mark.parametrize("t", [T, 3])
def test_weak_outputs_match(weak_pair, t):
    ours, ref = weak_pair
    audio, visual = random_inputs(20 + t, t)
    with torch.no_grad():
        av_gate, raw_logits, event_scores = ref(visual, audio)
        out = ours(audio, visual)
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.extras["event_gate"], av_gate, **close)
    torch.testing.assert_close(out.extras["event_scores"], raw_logits, **close)
    torch.testing.assert_close(out.scores.max(dim=1).values.softmax(-1), event_scores, **close)
    torch.testing.assert_close(out.spatial, ref.spatial_channel_att.last_spatial, **close)


def test_weak_loss_predictions_and_gradients_match(weak_pair):
    ours, ref = weak_pair
    audio, visual = random_inputs(5)
    labels, video_label = segment_labels(5)
    video_label[1] = C - 1  # mil_labels.h5 / labels_noisy.h5: background-only videos are labelled 28
    labels[1] = C - 1
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    av_gate, raw_logits, event_scores = ref(visual, audio)
    expected = nn.MultiLabelSoftMarginLoss()(event_scores, one_hot(video_label))  # weakly_main.py line 163
    out = ours(audio, visual)
    batch = {"labels": labels, "video_label": video_label, "valid": torch.ones(B, T, dtype=torch.bool)}
    got = ours.loss(out, batch, weak_pool="mean")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert ours.weak_pooling("mean") == ours.weak_pooling("max") == "max"
    # validate_epoch: compute_accuracy_supervised(av_gate, raw_logits, labels)
    pred = ref_predictions(av_gate, raw_logits)
    assert torch.equal(ours.predict(out), pred)
    assert torch.equal(out.scores.argmax(-1), pred)
    assert (pred == pred[:, :1]).all()  # sigmoid of a probability is > 0.5: every segment gets the video's class
    expected.backward()
    got.backward()
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        ref_grad = ref_params[ours_to_reference_key(key)].grad
        assert p.grad is not None and p.grad.abs().sum() > 0, key
        torch.testing.assert_close(p.grad, ref_grad.reshape(p.shape), rtol=1e-7, atol=1e-11)
    assert all(p.grad is None for k, p in ref_params.items() if k.startswith(IDLE_WEAK))
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def test_weak_loss_max_pools_over_valid_segments_only(weak_pair):
    ours, _ = weak_pair
    audio, visual = random_inputs(6)
    with torch.no_grad():
        out = ours(audio, visual)
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, 5:] = False
        batch = {"labels": torch.zeros(B, T, dtype=torch.long), "video_label": torch.tensor([2, 7]), "valid": valid}
        pooled = torch.stack([out.scores[0, :5].max(0).values, out.scores[1].max(0).values]).softmax(-1)
        expected = nn.MultiLabelSoftMarginLoss()(pooled, one_hot(batch["video_label"]))
        torch.testing.assert_close(ours.loss(out, batch), expected)


def test_setting_options_come_from_their_section():
    head = get_head("cmbs")
    cfg = head.make_config({"weak": {"alpha": 0.3}})
    assert cfg.weak.alpha == 0.3 and cfg.supervised.alpha == 0.1
    assert (cfg.supervised.beta, cfg.weak.beta) == (MAIN_JSON["beta"], WEAK_JSON["beta"])
    assert (cfg.supervised.gamma, cfg.weak.gamma) == (MAIN_JSON["gamma"], WEAK_JSON["gamma"])
    # beta = 0 drops the global branch of the attention
    small = head(C, "supervised", head.make_config({"supervised": {"beta": 0.0}}))
    assert not hasattr(small.spatial_channel_att, "ave_v_att")
    assert n_params(small) == OURS_SUPERVISED_PARAMS - 2 * (512 * 256 + 256) - (256 + 1)
