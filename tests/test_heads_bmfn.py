"""BMFN head (Liu et al. ICASSP 2022): sizes, MFB (eq. 2), AVFA (eq. 3), ESA (eq. 4), eq. 8 inference, losses."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from train.heads.base import HeadOutput
from train.heads.bmfn import (
    AttentionExpansion,
    AudioVisualFusionAttention,
    BMFNHead,
    MultiHeadAttention,
    VisualAttention,
)
from train.heads.layers import mfb_pool
from train.registry import get_head

from heads_testutils import fit_one_batch, linear, n_params, one_thread  # noqa: F401  (one_thread: autouse)


C, d, dv, da, dm, nh, r, ffn = 29, 256, 512, 128, 2560, 4, 2, 2048
VISUAL_FC = linear(dv, dv)  # public code's input adaptation (visual_fc option)
EQ1 = linear(dv, dv) + linear(dv, d) + linear(d, dv) + linear(dv, 1)  # Phi_v^c, W_1, W_2, W_3
EQ23 = 2 * linear(dv, dm) + 2 * linear(da, dm) + linear(dv, d) + linear(d, dv) + linear(d, 1)  # Phi_V/A 1-2, W_4-6
ATTENTION = 4 * linear(d, d)  # W_Q, W_K, W_V and the output projection
FFN = linear(d, ffn) + linear(ffn, d)
NSA = ATTENTION + FFN + 2 * 2 * d  # two LayerNorms
EXPANSION = nh * (nh * r) + 2 * (nh * r) + (nh * r) * nh + 2 * nh  # W_7, BN, W_8, BN (1x1 convs, no bias)
ESA = NSA + EXPANSION
SELF_V, SELF_A, SELF_AV = linear(dv, d) + ESA + NSA, linear(da, d) + ESA + NSA, linear(dv, d) + ESA + NSA
FA1, FA2 = linear(dv, d) + NSA, linear(da, d) + NSA  # queries v^E, a
BA1 = BA2 = linear(dv, d) + NSA  # query av
FBFM = NSA
CLASSIFIER = linear(d, 1) + linear(d, C - 1)  # eq. 8: relevance, foreground categories
TOTAL = VISUAL_FC + EQ1 + EQ23 + SELF_V + SELF_A + SELF_AV + FA1 + FA2 + BA1 + BA2 + 2 * FBFM + CLASSIFIER


def test_registered_with_paper_defaults():
    head = get_head("bmfn")
    assert head is BMFNHead and head.settings == ("supervised", "weak")
    defaults = head.train_defaults
    assert (defaults["lr"], defaults["batch_size"], defaults["lr_step"], defaults["lr_gamma"]) == (5e-4, 32, 10, 0.5)
    cfg = head.Config()
    assert (cfg.d, cfg.mfb_dim, cfg.mfb_pool, cfg.heads, cfg.expansion_ratio) == (256, 2560, 5, 4, 2)


def test_parameter_count_from_the_stated_sizes():
    assert n_params(BMFNHead(C)) == TOTAL


@pytest.mark.parametrize(
    "overrides, delta",
    [
        ({"visual_fc": False}, -VISUAL_FC),
        ({"fbfm": "first"}, -(SELF_A + FA2 + BA2 + FBFM)),  # BMFN w/o FBFM_2: only fa^1, ba^1
        ({"fbfm": "second"}, -(EQ1 + SELF_V + FA1 + BA1 + FBFM)),  # w/o FBFM_1: no visual attention at all
        ({"pairing": "direction", "fbfm": "first"}, -(SELF_V + SELF_A + BA1 + BA2 + FBFM)),  # forward only
        ({"pairing": "direction", "fbfm": "second"}, -(SELF_AV + FA1 + FA2 + FBFM)),  # backward only
        ({"joint": "concat"}, linear(2 * d, 1) + linear(2 * d, C - 1) - CLASSIFIER),
        ({"fbfm_ffn": False}, -2 * (FFN + 2 * d)),  # the public code's FBFM: attention + LayerNorm
        ({"esa_layers": 2, "nsa_layers": 2}, 3 * (ESA + NSA)),  # the public code's 2 + 2 layers
    ],
)
def test_ablation_switches_change_the_parameter_count(overrides, delta):
    assert n_params(BMFNHead(C, config=BMFNHead.make_config(overrides))) == TOTAL + delta


def test_mfb_sum_pooling_power_and_l2_normalisation_by_hand():
    product = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    # sum-pool k = 5 -> [15, -5]; signed sqrt -> [sqrt 15, -sqrt 5]; L2 -> divide by sqrt(20)
    expected = torch.tensor([math.sqrt(15 / 20), -math.sqrt(5 / 20)])
    torch.testing.assert_close(mfb_pool(product, 5), expected)
    with pytest.raises(ValueError, match="multiple"):
        mfb_pool(torch.ones(7), 5)


def small_config(**overrides):
    base = {"audio_dim": 3, "visual_dim": 4, "d": 8, "mfb_dim": 8, "mfb_pool": 2, "heads": 2, "ffn_dim": 16}
    return BMFNHead.make_config({**base, **overrides})


def test_visual_attention_follows_eq_1():
    torch.manual_seed(0)
    att = VisualAttention(4, 8, channel_residual=False).eval()
    v = torch.randn(1, 1, 3, 4)  # 3 positions
    with torch.no_grad():
        v_e, m_c, m_s = att(v)
        g = F.relu(att.phi[0](v[0, 0])).mean(0)  # GVP(Phi v)
        mc = torch.sigmoid(att.w2(F.relu(att.w1(g))))
        vc = mc * v[0, 0]
        ms = torch.softmax(torch.tanh(att.w3(vc)).squeeze(-1), 0)
    torch.testing.assert_close(m_c[0, 0], mc)
    torch.testing.assert_close(m_s[0, 0], ms)
    torch.testing.assert_close(v_e[0, 0], ms @ vc)


def test_avfa_follows_eq_2_and_3():
    torch.manual_seed(1)
    avfa = AudioVisualFusionAttention(small_config()).eval()
    v, a = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3)
    with torch.no_grad():
        av, w_c, w_s = avfa(v, a)

        def mfb(phi_v, phi_a):  # per position: product, sum-pool pairs, signed sqrt, L2
            rows = []
            for s in range(3):
                p = phi_v(v[0, 0, s]) * phi_a(a[0, 0])
                pooled = p.view(4, 2).sum(1)
                powered = torch.sign(pooled) * pooled.abs().sqrt()
                rows.append(powered / powered.norm())
            return torch.stack(rows)

        av1, av2 = mfb(avfa.v1, avfa.a1), mfb(avfa.v2, avfa.a2)
        w_t = F.relu(avfa.w4(av1))
        wc = torch.sigmoid(avfa.w5(w_t.mean(0)))
        ws = torch.softmax(torch.tanh(avfa.w6(w_t)).squeeze(-1), 0)
    torch.testing.assert_close(w_c[0, 0], wc)
    torch.testing.assert_close(w_s[0, 0], ws)
    torch.testing.assert_close(av[0, 0], ws @ (wc * av2), rtol=1e-4, atol=1e-5)


def test_expansion_self_attention_adds_refined_maps_and_is_built_once():
    torch.manual_seed(2)
    exp = AttentionExpansion(heads=2, ratio=2, act="sigmoid")
    esa = MultiHeadAttention(8, 2, dropout=0.0, expansion=exp).eval()
    nsa = MultiHeadAttention(8, 2, dropout=0.0).eval()
    nsa.load_state_dict({k: v for k, v in esa.state_dict().items() if not k.startswith("expansion")})
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        out_esa, _, att_esa = esa(x, x)
        out_nsa, _, att_nsa = nsa(x, x)
        refined = exp(att_nsa)  # BN(W_8 sigmoid(BN(W_7 Att)))
        torch.testing.assert_close(att_esa, att_nsa + refined)
        # W_7 mixes the head axis: a 1x1 convolution = a matrix over heads at every (i, j)
        bn7 = exp.bn7
        pre = torch.einsum("oh,bhij->boij", exp.w7.weight[:, :, 0, 0], att_nsa)
        hidden = torch.sigmoid((pre - bn7.running_mean.view(1, -1, 1, 1))
                               / torch.sqrt(bn7.running_var.view(1, -1, 1, 1) + bn7.eps)
                               * bn7.weight.view(1, -1, 1, 1) + bn7.bias.view(1, -1, 1, 1))
        post = torch.einsum("oh,bhij->boij", exp.w8.weight[:, :, 0, 0], hidden)
        bn8 = exp.bn8
        torch.testing.assert_close(refined, (post - bn8.running_mean.view(1, -1, 1, 1))
                                   / torch.sqrt(bn8.running_var.view(1, -1, 1, 1) + bn8.eps)
                                   * bn8.weight.view(1, -1, 1, 1) + bn8.bias.view(1, -1, 1, 1))
        # with W_8 = 0 and BN bias 0 the refinement vanishes and ESA equals NSA
        exp.w8.weight.zero_()
        torch.testing.assert_close(esa(x, x)[0], out_nsa)
        # the expansion layers are parameters of the module: same output on every call (eval)
        torch.testing.assert_close(esa(x, x)[0], esa(x, x)[0])
    assert {n for n, _ in esa.named_parameters() if n.startswith("expansion")} == {
        "expansion.w7.weight", "expansion.bn7.weight", "expansion.bn7.bias",
        "expansion.w8.weight", "expansion.bn8.weight", "expansion.bn8.bias"}


def test_eq8_inference_rule_and_scores_argmax():
    head = BMFNHead(5, config=small_config())  # 4 foreground classes + background 4
    s = torch.tensor([[2.0, -0.5, 0.0, -3.0]])  # sigmoid: 0.88, 0.38, 0.5, 0.05
    s_c = torch.tensor([[0.1, 1.5, -2.0, 0.3]])  # category 1
    out = HeadOutput(BMFNHead.segment_scores(s, s_c), {"relevance_logits": s, "category_logits": s_c})
    expected = torch.tensor([[1, 4, 1, 4]])  # s_t >= 0.5 -> category, else background
    assert torch.equal(head.predict(out), expected)
    assert torch.equal(out.scores.argmax(-1), expected)
    # background column is log(1 - s_t); the best foreground column is log s_t
    torch.testing.assert_close(out.scores[0, :, 4], F.logsigmoid(-s[0]))
    torch.testing.assert_close(out.scores[0, :, 1], F.logsigmoid(s[0]))


def test_supervised_loss_is_bce_on_relevance_plus_ce_on_category():
    head = BMFNHead(5, config=small_config())
    s = torch.tensor([[2.0, -0.5, 0.0], [1.0, 1.0, -1.0]])
    s_c = torch.tensor([[0.1, 1.5, -2.0, 0.3], [0.0, 0.0, 2.0, 0.0]])
    labels = torch.tensor([[1, 1, 4], [4, 4, 4]])  # second video: background only
    batch = {"labels": labels, "video_label": torch.tensor([1, 4]), "valid": torch.ones(2, 3, dtype=torch.bool)}
    out = HeadOutput(BMFNHead.segment_scores(s, s_c), {"relevance_logits": s, "category_logits": s_c})
    is_event = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    bce = F.binary_cross_entropy_with_logits(s, is_event)
    ce = -torch.log_softmax(s_c[0], 0)[1]  # the background-only video has no category term
    assert head.loss(out, batch).item() == pytest.approx((bce + ce).item(), rel=1e-6)


def test_weak_loss_pools_joint_scores_over_time():
    head = BMFNHead(5, "weak", config=small_config())
    s = torch.tensor([[2.0, -0.5, 0.0]])
    s_c = torch.tensor([[0.1, 1.5, -2.0, 0.3]])
    out = HeadOutput(BMFNHead.segment_scores(s, s_c), {"relevance_logits": s, "category_logits": s_c})
    batch = {"labels": None, "video_label": torch.tensor([1])}
    joint = torch.sigmoid(s)[0].unsqueeze(-1) * torch.softmax(s_c[0], 0)  # s_f [T, C-1]
    video = joint.max(0).values
    target = torch.tensor([0.0, 1.0, 0.0, 0.0])
    expected = F.binary_cross_entropy(video, target)
    assert head.loss(out, batch, weak_pool="mean").item() == pytest.approx(expected.item(), rel=1e-5)


def inputs(b=2, t=10, seed=0, da=128, dv=512, side=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, da, generator=g), torch.rand(b, t, side, side, dv, generator=g)


@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_full_size_head_reaches_every_parameter_in_both_settings(setting):
    torch.manual_seed(0)
    head = BMFNHead(C, setting)
    audio, visual = inputs(b=2, t=10)
    out = head(audio, visual)
    shapes = {k: tuple(v.shape) for k, v in out.extras.items()}
    assert shapes == {"channel_attention": (2, 10, 512), "visual_spatial_attention": (2, 10, 49),
                      "relevance_logits": (2, 10), "category_logits": (2, 28)}
    assert out.spatial.shape == (2, 10, 7, 7)  # AVFA's W^S on the 7 x 7 grid
    assert out.scores.shape == (2, 10, C)
    batch = {"labels": torch.randint(0, C, (2, 10)), "video_label": torch.tensor([3, 17]),
             "valid": torch.ones(2, 10, dtype=torch.bool)}
    head.loss(out, batch).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("overrides", [{"fbfm": "second"}, {"pairing": "direction", "fbfm": "first"},
                                       {"joint": "concat", "residual": "paper", "esa_activation": "relu6"}])
def test_variants_run_and_learn_a_small_batch(overrides):
    torch.manual_seed(0)
    head = BMFNHead(C, config=small_config(**overrides))
    audio, visual = inputs(b=4, t=5, da=3, dv=4, side=2)
    batch = {"labels": torch.tensor([[3, 3, 28, 28, 3]] * 4), "video_label": torch.tensor([3] * 4),
             "valid": torch.ones(4, 5, dtype=torch.bool)}
    losses, _ = fit_one_batch(head, audio, visual, batch, lr=3e-3, steps=8)
    assert losses[-1] < losses[0]
