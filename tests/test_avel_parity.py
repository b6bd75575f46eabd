"""Parity of our Tian et al. heads with the public reference code (YapengTian/AVE-ECCV18).

The reference side is rebuilt here from the published layer definitions (``models.py``: att_Net;
``models_fusion.py``: TBMRF_Net; ``models_weakly.py``: the weak att_Net; training losses of
``supervised_main.py`` / ``weak_supervised_main.py``): same layer names, sizes and forward order,
written for CPU and float64 (the original hard-codes ``.cuda()`` and T = 10). Identical weights are
loaded into both sides through an explicit state-dict key map and outputs are compared.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from train.heads.avel import ResidualFusionConfig
from train.heads.layers import pool_over_time
from train.registry import get_head

torch.set_num_threads(1)  # tiny tensors: one thread is fastest (no spin-waiting on a busy machine)

B, T, C = 2, 10, 29


# ---------------------------------------------------------------------------------------------
# transcription of the reference modules


class RefAttention(nn.Module):
    """The attention half shared by att_Net and TBMRF_Net (their forward, first block)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.affine_audio = nn.Linear(128, hidden_size)
        self.affine_video = nn.Linear(512, hidden_size)
        self.affine_v = nn.Linear(hidden_size, 49, bias=False)
        self.affine_g = nn.Linear(hidden_size, 49, bias=False)
        self.affine_h = nn.Linear(49, 1, bias=False)

    def attend(self, audio, video):
        flat = video.view(video.size(0) * video.size(1), -1, 512)  # [B*T, 49, 512]
        v_t = F.relu(self.affine_video(flat))
        a_t = F.relu(self.affine_audio(audio.view(-1, audio.size(-1))))
        content_v = self.affine_v(v_t) + self.affine_g(a_t).unsqueeze(2)
        z_t = self.affine_h(torch.tanh(content_v)).squeeze(2)
        alpha_t = F.softmax(z_t, dim=-1).view(z_t.size(0), -1, z_t.size(1))  # [B*T, 1, 49]
        c_t = torch.bmm(alpha_t, flat).view(-1, 512)
        self.last_alpha = alpha_t.view(video.size(0), video.size(1), 49)
        return c_t.view(video.size(0), -1, 512)


class RefAttNet(RefAttention):
    """att_Net(embedding_dim, hidden_dim, hidden_size, tagset_size) of models.py."""

    def __init__(self, hidden_dim=128, hidden_size=512, tagset_size=29, weak=False):
        super().__init__(hidden_size)
        self.weak = weak
        self.hidden_dim = hidden_dim
        self.lstm_audio = nn.LSTM(128, hidden_dim, 1, batch_first=True, bidirectional=True)
        self.lstm_video = nn.LSTM(512, hidden_dim, 1, batch_first=True, bidirectional=True)
        self.L1 = nn.Linear(hidden_dim * 4, 64)
        self.L2 = nn.Linear(64, tagset_size)

    def zero_state(self, n, like):
        return (like.new_zeros(2, n, self.hidden_dim), like.new_zeros(2, n, self.hidden_dim))

    def forward(self, audio, video):
        video_t = self.attend(audio, video)
        lstm_audio, _ = self.lstm_audio(audio.view(len(audio), 10, -1), self.zero_state(len(audio), audio))
        lstm_video, _ = self.lstm_video(video_t.view(len(video), 10, -1), self.zero_state(len(video), audio))
        output = F.relu(torch.cat((lstm_audio, lstm_video), -1))
        score = self.L2(F.relu(self.L1(output)))
        if not self.weak:
            return F.softmax(score, dim=-1)
        # models_weakly.py: MaxPool1d over time of the logits, softmax; returns (pooled, score)
        pooled = nn.MaxPool1d(score.size(1))(score.permute(0, 2, 1)).view(score.size(0), -1)
        return F.softmax(pooled, dim=-1), score


class RefTBMRFNet(RefAttention):
    """TBMRF_Net(embedding_dim, hidden_dim, hidden_size, tagset_size, nb_block) of models_fusion.py."""

    def __init__(self, hidden_dim=128, hidden_size=512, tagset_size=29, nb_block=1):
        super().__init__(hidden_size)
        self.hidden_dim = hidden_dim
        self.nb_block = nb_block
        self.lstm_audio = nn.LSTM(128, hidden_dim, 1, batch_first=True, bidirectional=True)
        self.lstm_video = nn.LSTM(512, hidden_dim, 1, batch_first=True, bidirectional=True)
        d = hidden_dim * 2
        self.U_v = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.U_a = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.L2 = nn.Linear(d, tagset_size)

    def block(self, audio, video):
        for _ in range(self.nb_block):
            video_residual, audio_residual = video, audio
            merged = torch.mul(self.U_v(video) + self.U_a(audio), 0.5)
            video = torch.tanh(audio_residual + merged)
            audio = torch.tanh(video_residual + merged)
        return torch.mul(video + audio, 0.5)

    def forward(self, audio, video):
        video_t = self.attend(audio, video)
        zeros = (audio.new_zeros(2, len(audio), self.hidden_dim), audio.new_zeros(2, len(audio), self.hidden_dim))
        lstm_audio, _ = self.lstm_audio(audio.view(len(audio), 10, -1), zeros)
        lstm_video, _ = self.lstm_video(video_t.view(len(video), 10, -1), zeros)
        return F.softmax(self.L2(self.block(lstm_audio, lstm_video)), dim=-1)


# ---------------------------------------------------------------------------------------------
# parameter counts from the layer sizes


def linear_params(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def bilstm_params(n_in, hidden):
    # per direction: W_ih [4h, in], W_hh [4h, h], b_ih [4h], b_hh [4h]
    return 2 * (4 * hidden * (n_in + hidden) + 8 * hidden)


def attention_params(d=512, k=49):
    return linear_params(128, d) + linear_params(512, d) + 2 * linear_params(d, k, False) + linear_params(k, 1, False)


ATT_NET_PARAMS = (attention_params() + bilstm_params(128, 128) + bilstm_params(512, 128)
                  + linear_params(512, 64) + linear_params(64, C))
TBMRF_PARAMS = (attention_params() + bilstm_params(128, 128) + bilstm_params(512, 128)
                + 4 * linear_params(256, 256) + linear_params(256, C))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# state-dict key maps (ours -> reference)


def ours_to_reference_key(key: str) -> str:
    for prefix in ("attention.", "classifier.", "fusion."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def load_reference_weights(ours: nn.Module, ref: nn.Module) -> None:
    ref_state = ref.state_dict()
    mapped = {k: ref_state[ours_to_reference_key(k)] for k in ours.state_dict()}
    assert sorted(ours_to_reference_key(k) for k in ours.state_dict()) == sorted(ref_state), \
        "our layers and the reference's do not correspond one to one"
    ours.load_state_dict(mapped, strict=True)


def random_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, T, 128, generator=g, dtype=torch.float64)
    visual = torch.rand(B, T, 7, 7, 512, generator=g, dtype=torch.float64) * 2.0
    return audio, visual


def build_pair(name, ref_factory, setting="supervised", config=None):
    torch.manual_seed(1)
    ref = ref_factory().double().eval()
    torch.manual_seed(2)  # different init: parity must come from the copied weights
    cls = get_head(name)
    ours = cls(C, setting, config).double().eval()
    load_reference_weights(ours, ref)
    return ours, ref


# ---------------------------------------------------------------------------------------------
# tests


def test_reference_counts_match_the_published_layer_sizes():
    assert n_params(RefAttNet()) == ATT_NET_PARAMS
    assert n_params(RefTBMRFNet()) == TBMRF_PARAMS


@pytest.mark.parametrize("name,factory,count", [
    ("a+v-att", RefAttNet, ATT_NET_PARAMS),
    ("concat-late", RefAttNet, ATT_NET_PARAMS),
    ("dmrn", RefTBMRFNet, TBMRF_PARAMS),
])
def test_parameter_count_equals_reference(name, factory, count):
    assert n_params(get_head(name)(C)) == count


@pytest.mark.parametrize("name", ["a+v-att", "concat-late"])
def test_att_net_outputs_match(name):
    ours, ref = build_pair(name, RefAttNet)
    audio, visual = random_inputs()
    with torch.no_grad():
        expected = ref(audio, visual)
        out = ours(audio, visual)
    torch.testing.assert_close(out.scores.softmax(-1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.spatial.reshape(B, T, 49), ref.last_alpha, rtol=1e-10, atol=1e-12)
    assert expected.argmax(-1).unique().numel() > 1  # not a degenerate comparison


@pytest.mark.parametrize("blocks", [1, 2])
def test_dmrn_outputs_match_tbmrf_net(blocks):
    config = ResidualFusionConfig(blocks=blocks)
    ours, ref = build_pair("dmrn", lambda: RefTBMRFNet(nb_block=blocks), config=config)
    audio, visual = random_inputs(blocks)
    with torch.no_grad():
        expected = ref(audio, visual)
        out = ours(audio, visual)
    torch.testing.assert_close(out.scores.softmax(-1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.spatial.reshape(B, T, 49), ref.last_alpha, rtol=1e-10, atol=1e-12)


def test_dmrn_two_blocks_follow_the_code_not_eq_5_6():
    """With two blocks the reference's stream swap matters: a model that updated each stream with
    its own residual (eq. 5-6 literally) gives different outputs, ours gives the code's."""
    config = ResidualFusionConfig(blocks=2)
    ours, ref = build_pair("dmrn", lambda: RefTBMRFNet(nb_block=2), config=config)
    audio, visual = random_inputs(5)
    h_a = ours.lstm_audio(audio)
    h_v = ours.lstm_video(ours.attend_map(audio, visual)[0])
    fusion = ours.fusion
    a, v = h_a, h_v
    for _ in range(2):
        merged = 0.5 * (fusion.U_a(a) + fusion.U_v(v))
        a, v = torch.tanh(a + merged), torch.tanh(v + merged)
    literal = F.softmax(ours.L2(0.5 * (a + v)), -1)
    with torch.no_grad():
        expected = ref(audio, visual)
    assert not torch.allclose(literal, expected, atol=1e-6)
    torch.testing.assert_close(ours(audio, visual).scores.softmax(-1), expected, rtol=1e-10, atol=1e-12)


def test_weak_att_net_scores_and_max_pooling_match():
    ours, ref = build_pair("a+v-att", lambda: RefAttNet(weak=True), setting="weak")
    audio, visual = random_inputs(3)
    with torch.no_grad():
        pooled_ref, score_ref = ref(audio, visual)
        out = ours(audio, visual)
    torch.testing.assert_close(out.scores, score_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pool_over_time(out.scores, None, "max").softmax(-1), pooled_ref, rtol=1e-10, atol=1e-12)
    # at test time the reference argmaxes the per-segment score
    assert torch.equal(ours.predict(out), score_ref.argmax(-1))


def one_hot(labels):
    return F.one_hot(labels, C).to(torch.float64)


def test_supervised_loss_is_the_reference_multilabel_soft_margin():
    ours, ref = build_pair("dmrn", RefTBMRFNet)
    audio, visual = random_inputs(4)
    labels = torch.randint(0, C, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"labels": labels, "video_label": labels[:, 0], "valid": torch.ones(B, T, dtype=torch.bool)}
    expected = nn.MultiLabelSoftMarginLoss()(ref(audio, visual), one_hot(labels))
    got = ours.loss(ours(audio, visual), batch)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # loss="ce" is the plain cross-entropy of the same logits
    ours.config.loss = "ce"
    out = ours(audio, visual)
    torch.testing.assert_close(ours.loss(out, batch), F.cross_entropy(out.scores.reshape(-1, C), labels.reshape(-1)))


def test_weak_loss_is_the_reference_loss_with_max_pool():
    ours, ref = build_pair("a+v-att", lambda: RefAttNet(weak=True), setting="weak")
    audio, visual = random_inputs(6)
    video_label = torch.tensor([3, 28])  # mil_labels.h5: one 1 per video, background = 28
    batch = {"labels": torch.zeros(B, T, dtype=torch.long), "video_label": video_label,
             "valid": torch.ones(B, T, dtype=torch.bool)}
    pooled_ref, _ = ref(audio, visual)
    expected = nn.MultiLabelSoftMarginLoss()(pooled_ref, one_hot(video_label))
    out = ours(audio, visual)
    torch.testing.assert_close(ours.loss(out, batch, weak_pool="max"), expected, rtol=1e-12, atol=1e-14)
    # paper eq. 7: average the last-FC outputs over time, then softmax
    eq7 = nn.MultiLabelSoftMarginLoss()(F.softmax(out.scores.mean(1), -1), one_hot(video_label))
    torch.testing.assert_close(ours.loss(out, batch, weak_pool="mean"), eq7, rtol=1e-12, atol=1e-14)
    assert abs(float(eq7.detach()) - float(expected.detach())) > 1e-9  # the two poolings differ


def test_reference_loss_gradients_match():
    """Same loss, same weights -> same gradients for every reference parameter."""
    ours, ref = build_pair("a+v-att", RefAttNet)
    audio, visual = random_inputs(7)
    labels = torch.randint(0, C, (B, T), generator=torch.Generator().manual_seed(1))
    nn.MultiLabelSoftMarginLoss()(ref(audio, visual), one_hot(labels)).backward()
    ours.loss(ours(audio, visual), {"labels": labels, "video_label": labels[:, 0]}).backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[ours_to_reference_key(key)], rtol=1e-8, atol=1e-12)
