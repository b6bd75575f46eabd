"""AVLTC head (Guo, Zhao, Gao): TSGA eq. 1-6, PTRF eq. 7-13 with its threshold rule, losses, sizes."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from train.heads.base import HeadOutput
from train.heads.avltc import AVLTCHead, PositiveTimeResidualFusion, threshold_correlation
from train.heads.layers import AudioGuidedVisualAttention
from train.registry import get_head

from heads_testutils import bilstm, fit_one_batch, linear, n_params, one_thread  # noqa: F401  (one_thread: autouse)


T, C = 10, 29
# AGVA (AVEL eq. 2-4, reference-code sizes d = 512, k = 49 regions)
AGVA = linear(128, 512) + linear(512, 512) + linear(512, 49, False) + linear(512, 49, False) + linear(49, 1, False)
# temporal selection (eq. 1-4): W_vd D_v x d, W_vt d x T, W_ad D_a x d, W_at d x T with d = 512
SELECT = linear(512, 512) + linear(512, T) + linear(128, 512) + linear(512, T)
LSTMS = bilstm(128, 128) + bilstm(512, 128)  # d_in = 256
c = 2 * 28  # twice the event categories
PTRF = (linear(256, c) + linear(256, c)  # W_at, W_vt (eq. 7-8)
        + linear(c, c) + 2 * c  # W_ft and its BatchNorm (weight + bias), eq. 9
        + linear(256, 256) + linear(256, 256))  # W_vp, W_ap (eq. 11-12)
CLASSIFIER = linear(256, 128) + linear(128, C)


def test_registered_with_paper_defaults():
    head = get_head("avltc")
    assert head is AVLTCHead and head.settings == ("supervised", "weak")
    assert (head.train_defaults["lr"], head.train_defaults["batch_size"]) == (1e-3, 128)
    cfg = head.Config()
    assert (cfg.threshold_supervised, cfg.threshold_weak, cfg.ptrf_dropout) == (0.0599, None, 0.2)


def test_parameter_count_from_the_stated_sizes():
    assert n_params(AVLTCHead(C)) == AGVA + SELECT + LSTMS + PTRF + CLASSIFIER


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"spatial_attention": "agva"}, AGVA + LSTMS + PTRF + CLASSIFIER),  # Table II row 2
        ({"ptrf": False}, AGVA + SELECT + LSTMS + CLASSIFIER),  # row 3
        ({"spatial_attention": "agva", "ptrf": False}, AGVA + LSTMS + CLASSIFIER),  # row 1
        # c = 10 instead of 56: W_at, W_vt 256 x c, W_ft c x c, BN 2c
        ({"correlation_dim": 10}, AGVA + SELECT + LSTMS + CLASSIFIER + PTRF
         - (2 * linear(256, 56) + linear(56, 56) + 2 * 56) + (2 * linear(256, 10) + linear(10, 10) + 2 * 10)),
    ],
)
def test_ablation_switches_change_the_parameter_count(overrides, expected):
    assert n_params(AVLTCHead(C, config=AVLTCHead.make_config(overrides))) == expected


@pytest.mark.parametrize("axis", ["hidden", "region"])
def test_agva_matches_eq_4_on_a_hand_made_example(axis):
    agva = AudioGuidedVisualAttention(audio_dim=1, visual_dim=2, hidden=1, regions=2, audio_term_axis=axis)
    with torch.no_grad():
        agva.affine_audio.weight.fill_(1.0), agva.affine_audio.bias.fill_(0.0)  # U_a(a) = relu(a)
        agva.affine_video.weight.copy_(torch.tensor([[1.0, 0.0]])), agva.affine_video.bias.fill_(0.0)  # relu(v_0)
        agva.affine_v.weight.copy_(torch.tensor([[1.0], [0.0]]))  # W_v U_v(v_i) = [v_i0, 0]
        agva.affine_g.weight.copy_(torch.tensor([[0.0], [1.0]]))  # W_a U_a(a) = [0, a]
        agva.affine_h.weight.copy_(torch.tensor([[1.0, 2.0]]))
    audio = torch.tensor([[[0.5]]])
    visual = torch.tensor([[[[1.0, 3.0], [2.0, -1.0]]]])  # two regions, v_00 = 1, v_10 = 2
    th = lambda x: torch.tanh(torch.tensor(x))  # noqa: E731
    if axis == "hidden":  # eq. 4: region i -> W_f tanh([v_i0 + 0, 0 + 0.5])
        x = torch.stack([th(1.0) + 2 * th(0.5), th(2.0) + 2 * th(0.5)])
    else:  # reference code: region i gets the i-th audio entry on every hidden unit
        x = torch.stack([th(1.0 + 0.0) + 2 * th(0.0 + 0.0), th(2.0 + 0.5) + 2 * th(0.0 + 0.5)])
    w = torch.softmax(x, 0)
    attended, weights = agva(audio, visual)
    logits = agva.logits(audio, visual)
    torch.testing.assert_close(logits[0, 0], x)
    torch.testing.assert_close(weights[0, 0], w)
    torch.testing.assert_close(attended[0, 0], w[0] * visual[0, 0, 0] + w[1] * visual[0, 0, 1])


def test_avltc_and_the_avel_heads_share_one_agva():
    """One implementation of AGVA (train.heads.layers) serves the Tian et al. heads and AVLTC's TSGA."""
    assert type(get_head("a+v-att")(29).attention) is AudioGuidedVisualAttention
    assert type(AVLTCHead(29).spatial.agva) is AudioGuidedVisualAttention


def inputs(b=2, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 128, generator=g), torch.rand(b, t, 7, 7, 512, generator=g)


def test_tsga_follows_eq_1_to_6():
    torch.manual_seed(0)
    head = AVLTCHead(C).eval()
    tsga = head.spatial
    audio, visual = inputs(b=1)
    v = visual.flatten(2, 3)
    with torch.no_grad():
        v_d, extras = tsga(audio, v)
        v_fd = F.relu(tsga.visual_select[0](v[0].mean(1)))  # eq. 1, V_avg [T, D_v]
        v_ft = F.relu(tsga.visual_select[2](v_fd))  # eq. 2 [T, T]
        a_ft = F.relu(tsga.audio_select[2](F.relu(tsga.audio_select[0](audio[0]))))  # eq. 3-4
        t_m = torch.softmax(v_ft + a_ft, dim=1)  # eq. 5
        s_map = tsga.agva.logits(audio, v)[0]  # [T, 49]
        att = torch.softmax(t_m @ s_map, dim=1)  # eq. 6
        expected = torch.stack([att[t] @ v[0, t] for t in range(T)])
    assert extras["temporal_weights"].shape == (1, T, T)
    torch.testing.assert_close(extras["temporal_weights"][0], t_m)
    torch.testing.assert_close(extras["spatial_attention"][0], att)
    torch.testing.assert_close(v_d[0], expected)


def test_tsga_rejects_another_number_of_segments_with_a_clear_message():
    head = AVLTCHead(C)
    audio, visual = inputs(b=1, t=4)
    with pytest.raises(ValueError, match="heads.avltc.segments"):
        head(audio, visual)
    agva_only = AVLTCHead(C, config=AVLTCHead.make_config({"spatial_attention": "agva"}))
    assert agva_only(audio, visual).scores.shape == (1, 4, C)


def test_threshold_rule_keeps_entries_at_or_above_epsilon():
    theta = torch.tensor([[0.5, 0.0599, 0.0598, 0.3803]])
    expected = torch.tensor([[0.5, 0.0599, 0.0, 0.3803]])
    torch.testing.assert_close(threshold_correlation(theta, 0.0599), expected)
    # per-video thresholds broadcast as [B, 1, 1]
    theta = torch.tensor([[[0.2, 0.8]], [[0.2, 0.8]]])
    eps = torch.tensor([0.1, 0.5]).view(2, 1, 1)
    torch.testing.assert_close(threshold_correlation(theta, eps), torch.tensor([[[0.2, 0.8]], [[0.0, 0.8]]]))


def ptrf_reference(ptrf: PositiveTimeResidualFusion, v_in, a_in, epsilon):
    """Eq. 7-13 for one video, written out (eval mode: no dropout, BN with running stats)."""
    c_at = F.relu(a_in @ ptrf.w_at.weight.T + ptrf.w_at.bias)
    c_vt = F.relu(v_in @ ptrf.w_vt.weight.T + ptrf.w_vt.bias)
    pre = torch.tanh(c_vt @ ptrf.w_ft.weight.T + ptrf.w_ft.bias)
    bn = ptrf.bn
    c_vh = (pre - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    theta = torch.softmax(c_at @ c_vh.T, dim=1)
    if epsilon is None:
        epsilon = (c_vt @ c_at.T).mean()
    theta = theta * (theta >= epsilon)
    a_p = a_in @ ptrf.w_ap.weight.T + ptrf.w_ap.bias
    v_paf = v_in @ ptrf.w_vp.weight.T + ptrf.w_vp.bias + theta @ a_p
    a_paf = a_p + theta.T @ v_paf
    return v_paf + a_paf, theta


@pytest.mark.parametrize("setting, epsilon, scale", [("supervised", 0.0599, 3.0), ("weak", None, 0.25)])
def test_ptrf_follows_eq_7_to_13_with_the_settings_threshold(setting, epsilon, scale):
    torch.manual_seed(3)
    head = AVLTCHead(C, setting)
    ptrf = head.ptrf
    with torch.no_grad():  # non-trivial BN statistics
        ptrf.bn.running_mean.uniform_(-0.2, 0.2), ptrf.bn.running_var.uniform_(0.5, 1.5)
        ptrf.bn.weight.uniform_(4.0, 6.0), ptrf.bn.bias.uniform_(-0.1, 0.1)
    head.eval()
    assert head.threshold() == epsilon
    g = torch.Generator().manual_seed(1)
    # features at a scale where the setting's threshold keeps some entries and drops others
    v_in, a_in = (scale * torch.tanh(torch.randn(2, T, 256, generator=g)) for _ in range(2))
    with torch.no_grad():
        fused, theta = ptrf(v_in, a_in, head.threshold())
        for b in range(2):
            ref_fused, ref_theta = ptrf_reference(ptrf, v_in[b], a_in[b], epsilon)
            torch.testing.assert_close(theta[b], ref_theta)
            torch.testing.assert_close(fused[b], ref_fused, rtol=1e-4, atol=1e-4)
    kept = (theta > 0).float().mean().item()
    assert 0.0 < kept < 1.0  # the threshold removed some correlations and kept others


def test_mean_rule_can_average_theta_instead():
    torch.manual_seed(3)
    ptrf = PositiveTimeResidualFusion(8, 4, 0.0, mean_of="theta").eval()
    g = torch.Generator().manual_seed(2)
    v_in, a_in = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    with torch.no_grad():
        raw, _ = ptrf.correlation(v_in, a_in)
        _, theta = ptrf(v_in, a_in, None)
    torch.testing.assert_close(theta, raw * (raw >= 1 / 5))  # rows of theta sum to 1: mean = 1/T


def test_without_ptrf_the_fused_feature_is_the_sum():
    torch.manual_seed(0)
    head = AVLTCHead(C, config=AVLTCHead.make_config({"ptrf": False})).eval()
    audio, visual = inputs(b=1)
    with torch.no_grad():
        v_d, _ = head.spatial(audio, visual.flatten(2, 3))
        expected = head.classifier(head.lstm_visual(v_d) + head.lstm_audio(audio))
        torch.testing.assert_close(head(audio, visual).scores, expected)


def test_supervised_loss_is_cross_entropy_over_valid_segments():
    head = AVLTCHead(C)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, T, C, generator=g)
    labels = torch.randint(0, C, (2, T), generator=g)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, 7:] = False
    got = head.loss(HeadOutput(scores), {"labels": labels, "video_label": labels[:, 0], "valid": valid})
    expected = F.cross_entropy(scores[valid], labels[valid])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weak_loss_is_bce_of_time_averaged_scores():
    head = AVLTCHead(C, "weak")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, T, C, generator=g)
    video_label = torch.tensor([4, 17])
    got = head.loss(HeadOutput(scores), {"labels": None, "video_label": video_label}, weak_pool="max")
    target = torch.zeros(2, C)
    target[0, 4] = target[1, 17] = 1
    expected = F.binary_cross_entropy_with_logits(scores.mean(1), target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_both_settings_train_every_parameter_and_fit_a_batch(setting):
    torch.manual_seed(0)
    head = AVLTCHead(C, setting)
    audio, visual = inputs(b=4, seed=5)
    g = torch.Generator().manual_seed(1)
    batch = {"labels": torch.randint(0, C, (4, T), generator=g), "video_label": torch.tensor([3, 5, 7, 9]),
             "valid": torch.ones(4, T, dtype=torch.bool)}
    losses, first_out = fit_one_batch(head, audio, visual, batch, lr=1e-3, steps=6)
    assert set(first_out.extras) == {"smap", "temporal_weights", "correlation"}
    assert first_out.spatial.shape == (4, T, 7, 7)
    assert losses[-1] < losses[0]
