"""Parity of the ``cace`` head with the public reference code Brain-Cog-Lab/CACE-Net (folder ``CACE/``).

The reference side is rebuilt here from ``CACE/model/models.py`` (``Co_Guided_Attention``) and
``CACE/model/main_model.py`` (``SupvLocalizeModule`` with ``encoder_q`` and ``data_augmentation``,
``supv_main_model``), plus the loss, contrastive-loss, switch and accuracy lines of
``CACE/supv_main.py``: same layer names and forward order, CPU, float64, T from the inputs. The
relation blocks (Encoder/Decoder layers and stacks, RNNEncoder, AudioVideoInter) are line for line
those of CMBS; their transcription is imported from tests/test_cmbs_parity.py. Identical weights are
loaded through an explicit key map. The feature noise of the contrastive key view: the reference draws
it in every forward, ours in training mode only (train/heads/cace.py); eval-mode comparisons turn the
transcription's noise off (``augment``), and a training-mode comparison with every dropout set to 0
draws the same noise on both sides from one seed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from train.heads.cace import CONTRASTIVE_START, contrastive_loss
from train.registry import get_head

from test_cmbs_parity import (IDLE_COMMON, RefAudioVideoInter, RefCrossModalRelationAttModule,
                              RefInternalTemporalRelationModule, RefRNNEncoder, ref_predictions, ref_supervised_loss,
                              ref_top4)
from test_cmbs_parity import ours_to_reference_key as cmbs_key

torch.set_num_threads(1)

B, T, C = 2, 10, 29

#: CACE/configs/main.json
MAIN_JSON = {"name": "supv_main_model", "video_inputdim": 512, "audio_inputdim": 128, "d_model": 256,
             "alpha": 0.1, "gamma": 0.3, "beta": 0.4}
#: the README / run_supp.sh run: --guide Co-Guide --psai 0.3 --contrastive --Lambda 0.6 --contras_coeff 1.0
PAPER_RUN = {"psai": 0.3, "guide": "Co-Guide", "contrastive": True, "Lambda": 0.6}
CONTRAS_COEFF = 1.0


# ---------------------------------------------------------------------------------------------
# transcription of the reference (CACE/model)


class RefCoGuidedAttention(nn.Module):
    """``Co_Guided_Attention(psai, beta, video_input_dim, audio_input_dim)``; records its spatial maps."""

    def __init__(self, psai, beta, video_input_dim, audio_input_dim):
        super().__init__()
        self.video_input_dim = video_input_dim
        self.audio_input_dim = audio_input_dim
        self.hidden_dim = 256
        self.beta = beta
        self.psai = psai
        self.relu = nn.ReLU()
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
        self.v_norm = nn.LayerNorm(self.video_input_dim)
        self.video_query2 = nn.Linear(self.video_input_dim, self.video_input_dim // self.latent_dim)
        self.video_key2 = nn.Linear(self.video_input_dim, self.video_input_dim // self.latent_dim)
        self.video_value2 = nn.Linear(self.video_input_dim, self.video_input_dim)
        self.v_norm2 = nn.LayerNorm(self.video_input_dim)  # registered, never run
        self.affine_video_ave = nn.Linear(self.video_input_dim, self.hidden_dim)
        self.affine_video_3 = nn.Linear(self.video_input_dim, self.hidden_dim)
        self.ave_bottleneck = nn.Linear(512, 256)  # registered, never run
        self.ave_v_att = nn.Linear(self.hidden_dim, 1)
        self.tanh = nn.Tanh()
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.2)
        self.v_query = nn.Linear(self.video_input_dim, self.audio_input_dim)
        self.vaudio_key = nn.Linear(self.audio_input_dim, self.audio_input_dim)
        self.vaudio_value = nn.Linear(self.audio_input_dim, self.audio_input_dim)
        self.audio_query = nn.Linear(self.audio_input_dim, self.audio_input_dim)
        self.audio_key = nn.Linear(self.audio_input_dim, self.audio_input_dim)
        self.audio_value = nn.Linear(self.audio_input_dim, self.audio_input_dim)
        self.a_norm = nn.LayerNorm(self.audio_input_dim)

    def forward(self, video, audio):  # video [B, T, 7, 7, 512], audio [T, B, 128]
        audio = audio.transpose(1, 0)
        batch, t_size, h, w, v_dim = video.size()
        a_dim = audio.size(-1)
        audio_feature = audio.reshape(batch * t_size, a_dim)
        raw_audio_feature = audio
        visual_feature = video.reshape(batch, t_size, -1, v_dim)
        raw_visual_feature = visual_feature
        # step 1: audio-guided visual attention, with the region self-attentions
        video_query_feature = self.video_query(visual_feature).reshape(batch * t_size, h * w, -1)
        video_key_feature = self.video_key(visual_feature).reshape(batch * t_size, h * w, -1).permute(0, 2, 1)
        energy = torch.bmm(video_query_feature, video_key_feature)
        attention = self.softmax(energy)
        video_value_feature = self.video_value(visual_feature).reshape(batch * t_size, h * w, -1)
        output = torch.matmul(attention, video_value_feature)
        output = self.v_norm(visual_feature.reshape(batch * t_size, h * w, -1) + self.dropout(output))
        video_query_feature = self.video_query2(visual_feature).reshape(batch * t_size, h * w, -1)
        video_key_feature = self.video_key2(visual_feature).reshape(batch * t_size, h * w, -1).permute(0, 2, 1)
        energy = torch.bmm(video_query_feature, video_key_feature)
        attention = self.softmax(energy)
        video_value_feature = self.video_value2(visual_feature).reshape(batch * t_size, h * w, -1)
        output2 = torch.matmul(attention, video_value_feature)
        output2 = self.v_norm(visual_feature.reshape(batch * t_size, h * w, -1) + self.dropout(output2))
        visual_feature = output
        visual_feature2 = output2
        video_average = visual_feature.sum(dim=1) / (h * w)
        video_average = video_average.reshape(batch * t_size, v_dim)
        video_average = self.relu(self.affine_video_ave(video_average)).unsqueeze(-2)
        self_video_att_feat = visual_feature.reshape(batch * t_size, -1, v_dim)
        self_video_att_query = self.relu(self.affine_video_3(self_video_att_feat))
        self_query = self_video_att_query * video_average
        self_spatial_att_maps = self.softmax(self.tanh(self.ave_v_att(self_query)).transpose(2, 1))
        self_att_feat = torch.bmm(self_spatial_att_maps, visual_feature).squeeze().reshape(batch, t_size, v_dim)
        audio_query_1 = self.relu(self.affine_audio_1(audio_feature)).unsqueeze(-2)
        video_query_1 = self.relu(self.affine_video_1(visual_feature)).reshape(batch * t_size, h * w, -1)
        audio_video_query_raw = (audio_query_1 * video_query_1).mean(-2)
        audio_video_query = self.relu(self.affine_bottleneck(audio_video_query_raw))
        channel_att_maps = self.affine_v_c_att(audio_video_query).sigmoid().reshape(batch, t_size, -1, v_dim)
        c_att_visual_feat = raw_visual_feature * (channel_att_maps + 1)
        c_att_visual_feat = c_att_visual_feat.reshape(batch * t_size, -1, v_dim)
        c_att_visual_query = self.relu(self.affine_video_2(c_att_visual_feat))
        audio_query_2 = self.relu(self.affine_audio_2(audio_feature)).unsqueeze(-2)
        audio_video_query_2 = c_att_visual_query * audio_query_2
        spatial_att_maps = self.softmax(self.tanh(self.affine_v_s_att(audio_video_query_2)).transpose(2, 1))
        guide_visual_feature = torch.bmm(spatial_att_maps, c_att_visual_feat).squeeze().reshape(batch, t_size, v_dim)
        guide_visual_feature = guide_visual_feature + self.beta * self_att_feat.sigmoid() * guide_visual_feature
        # step 2: visual-guided audio attention
        audio_query_feature = self.audio_query(raw_audio_feature)
        audio_key_feature = self.audio_key(raw_audio_feature).permute(0, 2, 1)
        energy = torch.bmm(audio_query_feature, audio_key_feature)
        attention = self.softmax(energy)
        audio_value_feature = self.audio_value(raw_audio_feature)
        output = torch.matmul(attention, audio_value_feature)
        tmp_guide_audio_feature = self.a_norm(raw_audio_feature + self.dropout(output))
        video_query = self.v_query(visual_feature2.sum(dim=1).reshape(batch, t_size, v_dim) / (h * w))
        audio_key = self.vaudio_key(tmp_guide_audio_feature).permute(0, 2, 1)
        energy = torch.bmm(video_query, audio_key)
        attention = self.softmax(energy)
        audio_value = self.vaudio_value(tmp_guide_audio_feature)
        guide_audio_feature = torch.matmul(attention, audio_value)
        raw_audio_feature = raw_audio_feature + self.psai * guide_audio_feature.sigmoid() * raw_audio_feature
        self.last_spatial = spatial_att_maps.reshape(batch, t_size, h, w)
        self.last_global = self_spatial_att_maps.reshape(batch, t_size, h, w)
        return guide_visual_feature, raw_audio_feature


class RefCACESupvLocalizeModule(nn.Module):
    """``SupvLocalizeModule(d_model, contrastive, Lambda)`` of CACE/model/main_model.py."""

    def __init__(self, d_model, contrastive, Lambda=0.0):
        super().__init__()
        self.Lambda = Lambda
        self.relu = nn.ReLU(inplace=True)
        self.contrastive = contrastive
        self.classifier = nn.Linear(d_model, 1)
        self.encoder_q = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU())
        self.event_classifier = nn.Linear(d_model, 28)
        self.augment = True  # test switch (not in the reference): False skips data_augmentation's noise

    def forward(self, fused_content, contrastive_switch):  # fused_content [T, B, d]
        query_fused_content = self.encoder_q(fused_content)
        max_fused_content, _ = fused_content.transpose(1, 0).max(1)
        if self.contrastive is True:
            output_content = fused_content
            if contrastive_switch is True:
                output_content = output_content + self.Lambda * query_fused_content
            logits = self.classifier(output_content)
        else:
            logits = self.classifier(fused_content)
        query_fused_content = nn.functional.normalize(query_fused_content, dim=2).transpose(1, 0)
        key_fused_content = self.encoder_q(self.data_augmentation(fused_content))
        key_fused_content = nn.functional.normalize(key_fused_content, dim=2).transpose(1, 0)
        class_logits = self.event_classifier(max_fused_content)
        return logits, class_logits, query_fused_content, key_fused_content

    def data_augmentation(self, fused_content):
        if not self.augment:
            return fused_content
        noise = torch.randn_like(fused_content) * 0.1
        return fused_content + noise


class RefCACESupvMainModel(nn.Module):
    """``supv_main_model(config, psai, guide, contrastive, Lambda)``; guides Co-Guide and Audio-Guide."""

    def __init__(self, config, psai=0.0, guide=False, contrastive=False, Lambda=0.0):
        super().__init__()
        self.config = config
        self.beta = config["beta"]
        self.psai = psai
        self.guide = guide
        self.video_input_dim = config["video_inputdim"]
        self.audio_input_dim = config["audio_inputdim"]
        self.video_fc_dim = 512
        self.audio_fc_dim = 128
        self.d_model = config["d_model"]
        if self.guide == "Co-Guide":
            self.spatial_channel_att = RefCoGuidedAttention(self.psai, self.beta, self.video_fc_dim, self.audio_fc_dim)
        elif self.guide == "Audio-Guide":
            self.spatial_channel_att = RefCoGuidedAttention(0.0, self.beta, self.video_fc_dim, self.audio_fc_dim)
        else:
            raise NotImplementedError(guide)  # Visual-Guide / None: ablations the head does not offer
        self.v_fc = nn.Linear(self.video_input_dim, self.video_fc_dim)
        self.a_fc = nn.Linear(self.audio_input_dim, self.audio_fc_dim)  # registered, never run
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.2)
        self.video_encoder = RefInternalTemporalRelationModule(self.video_fc_dim, self.d_model, 1024)
        self.video_decoder = RefCrossModalRelationAttModule(self.video_fc_dim, self.d_model, 512)
        self.audio_encoder = RefInternalTemporalRelationModule(self.d_model, self.d_model, 1024)
        self.audio_decoder = RefCrossModalRelationAttModule(self.d_model, self.d_model, 512)
        self.audio_visual_rnn_layer = RefRNNEncoder(self.audio_fc_dim, self.video_fc_dim, self.d_model, 1)
        self.audio_gated = nn.Sequential(nn.Linear(self.d_model, 1), nn.Sigmoid())
        self.video_gated = nn.Sequential(nn.Linear(self.d_model, 1), nn.Sigmoid())
        self.AVInter = RefAudioVideoInter(self.d_model, n_head=4, head_dropout=0.2)
        self.VAInter = RefAudioVideoInter(self.d_model, n_head=4, head_dropout=0.2)
        self.localize_module = RefCACESupvLocalizeModule(self.d_model, contrastive=contrastive, Lambda=Lambda)
        self.audio_cas = nn.Linear(self.d_model, 28)
        self.video_cas = nn.Linear(self.d_model, 28)
        self.alpha = config["alpha"]
        self.gamma = config["gamma"]
        self.contrastive_switch = False

    def forward(self, visual_feature, audio_feature):
        audio_feature = audio_feature.transpose(1, 0).contiguous()
        visual_feature = self.dropout(self.relu(self.v_fc(visual_feature)))
        visual_feature, audio_rnn_input = self.spatial_channel_att(visual_feature, audio_feature)
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
        is_event_scores, event_scores, contrastive_feature1, contrastive_feature2 = self.localize_module(
            (video_query_output + audio_query_output) / 2, self.contrastive_switch)
        event_scores = event_scores + self.gamma * av_score
        return is_event_scores, event_scores, audio_visual_gate, av_score, contrastive_feature1, contrastive_feature2


def ref_contrastive_loss(q, k, labels_BCE):
    """supv_main.py lines 209-239 (``.cuda()`` dropped): q, k [N, T, C], labels_BCE [N, T] float."""
    N, T_, C_ = q.shape
    mask = torch.ones(T_, T_) - torch.eye(T_, T_)  # float32, as the reference's .cuda() tensors
    mask_expand = mask.unsqueeze(0).repeat(N, 1, 1)
    mask_final = torch.ones(2 * T_, 2 * T_) - torch.eye(2 * T_, 2 * T_)
    mask_final = mask_final.unsqueeze(0).repeat(N, 1, 1)
    contrast_feature = torch.cat([q, k], dim=1)
    logits = torch.einsum("ntc,nck->ntk", [contrast_feature, contrast_feature.permute(0, 2, 1)])
    logits /= 0.01
    scores_pos_ind_q = labels_BCE.unsqueeze(-1) * labels_BCE.unsqueeze(1) * mask_expand
    scores_pos_ind_k = labels_BCE.unsqueeze(-1) * labels_BCE.unsqueeze(1) + torch.eye(T_)
    scores_pos_ind_k = torch.clamp(scores_pos_ind_k, 0, 1)
    scores_pos_ind = torch.zeros(N, 2 * T_, 2 * T_)
    scores_pos_ind[:, :T_, :T_] = scores_pos_ind_q
    scores_pos_ind[:, :T_, T_:2 * T_] = scores_pos_ind_k
    scores_pos_ind[:, T_:2 * T_, :T_] = scores_pos_ind_k
    scores_pos_ind[:, T_:2 * T_, T_:2 * T_] = scores_pos_ind_q
    num_pos_pairs = labels_BCE.sum(1).unsqueeze(-1)
    index = torch.log(torch.cat([labels_BCE * (2 * num_pos_pairs - 2), labels_BCE * (2 * num_pos_pairs - 2)], dim=1)
                      + torch.ones(1, 2 * T_))
    log_prob_k = torch.log((torch.exp(logits) * scores_pos_ind.float()).sum(dim=2)) \
        - torch.log((torch.exp(logits) * mask_final.float()).sum(dim=2)) - index
    return (-log_prob_k).mean()


def ref_training_loss(outputs, labels, epoch, n_epoch, contrastive=True):
    """train_epoch's loss (lines 195-245) for a 0-based ``epoch`` of ``n_epoch``."""
    is_event_scores, event_scores, audio_visual_gate, av_score, q, k = outputs
    loss, terms = ref_supervised_loss(is_event_scores, event_scores, audio_visual_gate, av_score, labels)
    labels_BCE, _ = labels[:, :, :-1].max(-1)
    terms["contrastive"] = ref_contrastive_loss(q, k, labels_BCE)
    if contrastive and epoch >= n_epoch / 8:
        loss = loss + CONTRAS_COEFF * terms["contrastive"]
    return loss, terms


# ---------------------------------------------------------------------------------------------
# key map and helpers


def ours_to_reference_key(key: str) -> str:
    if key.startswith("spatial_channel_att.norm."):
        return "spatial_channel_att.v_norm." + key[len("spatial_channel_att.norm."):]
    return cmbs_key(key)


IDLE = IDLE_COMMON + ("a_fc.", "spatial_channel_att.v_norm2.")
#: the visual-guided audio branch: built and run by the reference also at psai = 0, times 0
AUDIO_GUIDE_BRANCH = tuple(f"spatial_channel_att.{name}." for name in (
    "video_query2", "video_key2", "video_value2", "v_query", "vaudio_key", "vaudio_value", "audio_query", "audio_key",
    "audio_value", "a_norm"))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def load_reference_weights(ours, ref, idle):
    ref_state = ref.state_dict()
    used = {ours_to_reference_key(k) for k in ours.state_dict()}
    idle_keys = {k for k in ref_state if k.startswith(idle)}
    assert not used & idle_keys, sorted(used & idle_keys)
    assert used | idle_keys == set(ref_state), sorted(set(ref_state) - used - idle_keys)
    ours.load_state_dict({k: ref_state[ours_to_reference_key(k)] for k in ours.state_dict()}, strict=True)


def random_inputs(seed, t=T):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, t, 128, generator=g, dtype=torch.float64)
    visual = torch.rand(B, t, 7, 7, 512, generator=g, dtype=torch.float64) * 2.0
    return audio, visual


def segment_labels(seed, t=T):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((B, t), C - 1, dtype=torch.long)
    video_label = torch.randint(0, C - 1, (B,), generator=g)
    for b in range(B):
        start = int(torch.randint(0, t - 3, (1,), generator=g))
        labels[b, start:start + 4] = video_label[b]
    return labels, video_label


def one_hot(labels):
    return F.one_hot(labels, C).to(torch.float64)


def build_pair(psai=0.3, contrastive=True, balance_on=None):
    run = dict(PAPER_RUN, psai=psai, contrastive=contrastive)
    if psai == 0:
        run["guide"] = "Audio-Guide"
    torch.manual_seed(1)
    ref = RefCACESupvMainModel(MAIN_JSON, **run).double().eval()
    if balance_on is not None:  # about half of the segments predicted as events (non-degenerate rule check)
        audio, visual = balance_on
        with torch.no_grad():
            ref.localize_module.classifier.bias.data -= ref(visual, audio)[0].flatten().quantile(0.5)
    torch.manual_seed(2)
    head = get_head("cace")
    ours = head(C, "supervised", head.make_config({"psai": psai, "contrastive": contrastive})).double().eval()
    idle = IDLE + (() if contrastive else ("localize_module.encoder_q.",)) + (AUDIO_GUIDE_BRANCH if psai == 0 else ())
    load_reference_weights(ours, ref, idle)
    return ours, ref


@pytest.fixture(scope="module")
def pair():
    return build_pair(balance_on=random_inputs(3))


def run_both(ours, ref, audio, visual, switch, seed=7):
    """Forward both with the same switch; the reference's key-view noise follows ours (training mode
    only), from the same seed."""
    ref.contrastive_switch = switch
    ref.localize_module.augment = ours.training
    ours.contrastive_on = switch
    torch.manual_seed(seed)
    ref_out = ref(visual, audio)
    torch.manual_seed(seed)
    return ours(audio, visual), ref_out


# ---------------------------------------------------------------------------------------------
# tests


REF_PARAMS = 13_118_681  # supv_main_model(configs/main.json, Co-Guide, psai 0.3, contrastive), C = 29
OURS_PARAMS = 9_283_417


def test_parameter_counts(pair):
    ours, ref = pair
    assert n_params(ref) == REF_PARAMS
    assert n_params(ours) == OURS_PARAMS
    assert REF_PARAMS - sum(p.numel() for k, p in ref.named_parameters() if k.startswith(IDLE)) == OURS_PARAMS


@pytest.mark.parametrize("switch", [True, False])
def test_outputs_match(pair, switch):
    ours, ref = pair
    audio, visual = random_inputs(11)
    with torch.no_grad():
        out, (is_event, event, gate, av_score, q, k) = run_both(ours, ref, audio, visual, switch)
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.extras["is_event_scores"], is_event.transpose(0, 1).squeeze(-1), **close)
    torch.testing.assert_close(out.extras["event_scores"], event, **close)
    torch.testing.assert_close(out.extras["gate"], gate.transpose(0, 1).squeeze(-1), **close)
    torch.testing.assert_close(out.extras["cas_scores"], av_score, **close)
    torch.testing.assert_close(out.extras["contrastive_query"], q, **close)
    torch.testing.assert_close(out.extras["contrastive_key"], k, **close)
    torch.testing.assert_close(out.spatial, ref.spatial_channel_att.last_spatial, **close)
    torch.testing.assert_close(out.extras["global_attention"], ref.spatial_channel_att.last_global, **close)


def without_dropout(module):
    """Every dropout probability of ``module`` set to 0 (nn.Dropout and nn.MultiheadAttention)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return module


def test_training_mode_key_view_gets_the_reference_noise():
    """Ours in training mode without dropout = the reference in eval mode with its noise, same seed:
    the same noise values reach the key view (drawn in the reference's [T, B, d] order)."""
    ours, ref = build_pair()
    without_dropout(ours).train()
    audio, visual = random_inputs(14)
    with torch.no_grad():
        out, (_, _, _, _, q, k) = run_both(ours, ref, audio, visual, True)
    torch.testing.assert_close(out.extras["contrastive_query"], q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.extras["contrastive_key"], k, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(q, k)
    ours.eval()
    with torch.no_grad():
        out = ours(audio, visual)
    assert torch.equal(out.extras["contrastive_key"], out.extras["contrastive_query"])  # no noise in eval


def test_switch_changes_the_is_event_logits(pair):
    ours, _ = pair
    audio, visual = random_inputs(12)
    with torch.no_grad():
        ours.contrastive_on = True
        on = ours(audio, visual).extras["is_event_scores"]
        ours.contrastive_on = False
        off = ours(audio, visual).extras["is_event_scores"]
    ours.contrastive_on = True
    assert not torch.allclose(on, off)


@pytest.mark.parametrize("epoch0", [24, 25])  # 0-based epochs of a 200-epoch run: off, then on
def test_loss_predictions_and_gradients_match(pair, epoch0):
    ours, ref = pair
    audio, visual = random_inputs(3)
    labels, video_label = segment_labels(3)
    batch = {"labels": labels, "video_label": video_label, "valid": torch.ones(B, T, dtype=torch.bool)}
    ours.start_epoch(epoch0 + 1, 200)  # the loop counts epochs from 1
    switch = epoch0 >= 200 / 8  # supv_main.py line 182
    assert ours.contrastive_on == switch
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    out, ref_out = run_both(ours, ref, audio, visual, switch)
    expected, expected_terms = ref_training_loss(ref_out, one_hot(labels), epoch0, 200)
    got = ours.loss(out, batch)
    torch.testing.assert_close(got["loss"], expected, rtol=1e-10, atol=1e-12)
    for name, term in expected_terms.items():
        torch.testing.assert_close(got[name], term, rtol=1e-10, atol=1e-12)
    pred = ref_predictions(ref_out[0].transpose(1, 0).squeeze(), ref_out[1])
    assert torch.equal(ours.predict(out), pred)
    assert 0 < int((pred == C - 1).sum()) < pred.numel()
    assert torch.equal(out.scores.argmax(-1), pred)
    expected.backward()
    got["loss"].backward()
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        ref_grad = ref_params[ours_to_reference_key(key)].grad
        if key.startswith("localize_module.encoder_q.") and not switch:
            assert p.grad is None and ref_grad is None  # encoder_q trains only once the switch is on
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, key
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-7, atol=1e-11)
    assert all(p.grad is None for k, p in ref_params.items() if k.startswith(IDLE))
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    ours.contrastive_on = True


def test_start_epoch_follows_the_reference_switch():
    head = get_head("cace")(C, "supervised", get_head("cace").make_config({"d": 8, "heads": 2, "att_dim": 8}))
    assert head.contrastive_on  # built outside the loop: the trained model (as --evaluate sets it)
    for epochs in (200, 10, 7):
        on = []
        for epoch in range(1, epochs + 1):
            head.start_epoch(epoch, epochs)
            on.append(head.contrastive_on)
        assert on == [(e - 1) >= epochs / 8 for e in range(1, epochs + 1)]
        assert on == [e0 >= epochs * CONTRASTIVE_START for e0 in range(epochs)]
    head.start_epoch(1, 200)
    assert not head.contrastive_on
    head.start_epoch(26, 200)  # 0-based epoch 25 = 200 / 8
    assert head.contrastive_on


def test_audio_guide_and_no_contrastive_variants_match():
    """psai = 0 (the reference's --guide Audio-Guide) and contrastive off (no --contrastive)."""
    audio, visual = random_inputs(13)
    for psai, contrastive in ((0.0, True), (0.3, False)):
        ours, ref = build_pair(psai, contrastive)
        with torch.no_grad():
            out, ref_out = run_both(ours, ref, audio, visual, True)
        torch.testing.assert_close(out.extras["is_event_scores"], ref_out[0].transpose(0, 1).squeeze(-1),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.extras["event_scores"], ref_out[1], rtol=1e-10, atol=1e-10)
        assert ("contrastive_query" in out.extras) == contrastive
        labels, video_label = segment_labels(13)
        got = ours.loss(out, {"labels": labels, "video_label": video_label})
        expected, _ = ref_training_loss(ref_out, one_hot(labels), 199, 200, contrastive)
        torch.testing.assert_close(got["loss"], expected, rtol=1e-10, atol=1e-12)
        idle = sum(p.numel() for k, p in ref.named_parameters()
                   if k.startswith(IDLE + (AUDIO_GUIDE_BRANCH if psai == 0 else ("localize_module.encoder_q.",))))
        assert n_params(ours) == n_params(ref) - idle


def test_contrastive_loss_is_finite_in_float32_and_skips_invalid_segments():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, T, 16, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(q + 0.01 * torch.randn(B, T, 16, generator=g, dtype=torch.float64), dim=-1)
    is_event = torch.zeros(B, T, dtype=torch.bool)
    is_event[:, 2:6] = True
    valid = torch.ones(B, T, dtype=torch.bool)
    expected = ref_contrastive_loss(q, k, is_event.double())
    torch.testing.assert_close(contrastive_loss(q, k, is_event, valid), expected, rtol=1e-10, atol=1e-12)
    # float32: the reference's exp(100) overflows, ours (logsumexp) stays finite and equal to float64
    assert not torch.isfinite(ref_contrastive_loss(q.float(), k.float(), is_event.float()))
    torch.testing.assert_close(contrastive_loss(q.float(), k.float(), is_event, valid), expected.float(), rtol=1e-5,
                               atol=1e-5)
    # invalid segments are neither anchors nor candidates: same as cutting them off
    valid[1, 7:] = False
    first = contrastive_loss(q[:1], k[:1], is_event[:1], valid[:1])
    second = contrastive_loss(q[1:, :7], k[1:, :7], is_event[1:, :7], valid[1:, :7])
    cut = (first * 2 * T + second * 2 * 7) / (2 * T + 2 * 7)  # means over 2T and 2 * 7 valid views
    torch.testing.assert_close(contrastive_loss(q, k, is_event, valid), cut, rtol=1e-10, atol=1e-12)
