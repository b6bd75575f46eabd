"""Co-attention head (Xue et al. TMM 2021): sizes from Table I, eq. 1-3 and 6-7 on hand-made inputs."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from train.heads.base import HeadOutput
from train.heads.coattention import CoAttentionHead, soft_margin_segments
from train.registry import get_head

from heads_testutils import bilstm, fit_one_batch, linear, n_params, one_thread  # noqa: F401  (one_thread: autouse)


# Table I, with C_a1 = 128, C_v1 = 512, H x W = 49 (Section IV-A)
FC1 = linear(128, 512) + linear(512, 49)  # audio -> [512, 49]
FC2 = linear(512, 512) + linear(512, 49)  # visual position -> [512, 49]
FC3 = linear(49, 1)
FC4 = linear(49, 256) + linear(256, 49)
FC5 = linear(49, 128)
FC_V2A = linear(512, 128)
FC_A2V = linear(128, 512)
FC6 = linear(128, 128)
FC7 = linear(512, 512)
LSTMS = bilstm(128, 128) + bilstm(512, 128)  # per stream: audio and visual BLSTM, hidden 128
CLASSIFIER = linear(2 * 256, 64) + linear(64, 29)  # Fig. 2(c): 64 then 29 on cat(L^a, L^v)
CSPA = FC1 + FC2 + FC3 + FC4 + FC5 + LSTMS + CLASSIFIER
CSEA = FC_V2A + FC_A2V + FC6 + FC7 + LSTMS + CLASSIFIER


def test_registered_with_paper_defaults():
    head = get_head("coattention")
    assert head is CoAttentionHead
    assert head.settings == ("supervised", "weak")
    assert head.train_defaults["lr"] == 1e-3 and head.train_defaults["batch_size"] == 64
    assert head.train_defaults["epochs"] == 300
    cfg = head.Config()
    assert (cfg.lambda_supervised, cfg.lambda_weak, cfg.weak_pool) == (0.3, 0.7, "max")


def test_parameter_count_matches_table_one():
    assert n_params(CoAttentionHead(29)) == CSPA + CSEA


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"streams": "cspa"}, CSPA),
        ({"streams": "csea"}, CSEA),
        ({"audio_attention": False}, CSPA + CSEA - FC4 - FC5),  # (CSPA /aa) + CSEA
        ({"semantic_branches": "a2v"}, CSPA + CSEA - FC_V2A - FC6),  # CSPA + (CSEA /v2a)
        ({"semantic_branches": "v2a"}, CSPA + CSEA - FC_A2V - FC7),  # CSPA + (CSEA /a2v)
    ],
)
def test_ablation_switches_remove_their_layers(overrides, expected):
    head = CoAttentionHead(29, config=CoAttentionHead.make_config(overrides))
    assert n_params(head) == expected


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="lamda"):
        CoAttentionHead.make_config({"lamda_supervised": 0.5})


def inputs(b=2, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 128, generator=g), torch.rand(b, t, 7, 7, 512, generator=g)


def test_documented_intermediate_shapes_and_normalisation():
    torch.manual_seed(0)
    head = CoAttentionHead(29).eval()
    audio, visual = inputs()
    with torch.no_grad():
        out = head(audio, visual)
    shapes = {k: tuple(v.shape) for k, v in out.extras.items()}
    assert shapes == {
        "scores_cspa": (2, 4, 29), "scores_csea": (2, 4, 29),
        "audio_attention": (2, 4, 49), "audio_semantic": (2, 4, 128), "visual_semantic": (2, 4, 512)}
    assert out.spatial.shape == (2, 4, 7, 7)  # CSPA's Z^v_att on the 7 x 7 grid
    torch.testing.assert_close(out.spatial.sum((-2, -1)), torch.ones(2, 4))
    for key in ("audio_attention", "audio_semantic", "visual_semantic"):
        torch.testing.assert_close(out.extras[key].sum(-1), torch.ones(2, 4))
    # inference averages the two streams
    torch.testing.assert_close(out.scores, (out.extras["scores_cspa"] + out.extras["scores_csea"]) / 2)


def test_cspa_follows_eq_1_and_2_position_by_position():
    torch.manual_seed(1)
    head = CoAttentionHead(29).eval()
    cspa = head.cspa
    audio, visual = inputs(b=1, t=1, seed=3)
    a, v = audio[0, 0], visual[0, 0].reshape(49, 512)
    with torch.no_grad():
        out = cspa(audio, visual.flatten(2, 3))
        fa = cspa.f1(a)  # f1(F^a): 49
        f_av = torch.stack([fa * cspa.f2(v[s]) for s in range(49)])  # row s = f1(F^a) (.) f2(F^v_s)
        z = torch.stack([cspa.f3(f_av[s])[0] for s in range(49)])
        z_att = torch.exp(z) / torch.exp(z).sum()
        v_spa = sum(z_att[s] * v[s] for s in range(49))
        pooled = sum(z[s] * f_av[s] for s in range(49))  # F^av (x) Z
        za = cspa.f4(pooled)
        za_att = torch.exp(za) / torch.exp(za).sum()
        a_spa = cspa.f5(za_att * fa) + a
    torch.testing.assert_close(out["spatial"][0, 0], z_att)
    torch.testing.assert_close(out["visual"][0, 0], v_spa)
    torch.testing.assert_close(out["audio_att"][0, 0], za_att)
    torch.testing.assert_close(out["audio"][0, 0], a_spa)


def test_csea_follows_eq_3_with_plus_one_residual():
    torch.manual_seed(2)
    head = CoAttentionHead(29).eval()
    csea = head.csea
    audio, visual = inputs(b=1, t=1, seed=4)
    a, g = audio[0, 0], visual[0, 0].reshape(49, 512).mean(0)  # G(F^v)
    with torch.no_grad():
        out = csea(audio, visual.flatten(2, 3))
        att_a = torch.softmax(csea.f6(a * csea.f_v2a(g)), 0)
        att_v = torch.softmax(csea.f7(g * csea.f_a2v(a)), 0)
    torch.testing.assert_close(out["audio"][0, 0], (att_a + 1) * a)
    torch.testing.assert_close(out["visual"][0, 0], (att_v + 1) * g)
    # one-branch CSEA keeps the other modality unchanged (no attention)
    only_a2v = CoAttentionHead(29, config=CoAttentionHead.make_config({"semantic_branches": "a2v"})).csea
    with torch.no_grad():
        out = only_a2v(audio, visual.flatten(2, 3))
    torch.testing.assert_close(out["audio"], audio)


def test_eq6_soft_margin_value_by_hand():
    scores = torch.tensor([[[2.0, -1.0, 0.0]]])  # one segment, C = 3, label 0
    target = torch.tensor([[[1.0, 0.0, 0.0]]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(math.log(sig(2.0)) + math.log(1 - sig(-1.0)) + math.log(1 - sig(0.0))) / 3
    got = soft_margin_segments(scores, target, torch.ones(1, 1, dtype=torch.bool))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def batch_for(b=2, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 29, (b, t), generator=g)
    return {"labels": labels, "video_label": torch.tensor([3, 28][:b]), "valid": torch.ones(b, t, dtype=torch.bool)}


def fake_output(seed=0, b=2, t=4):
    g = torch.Generator().manual_seed(seed)
    e1, e2 = torch.randn(b, t, 29, generator=g), torch.randn(b, t, 29, generator=g)
    return HeadOutput(scores=(e1 + e2) / 2, extras={"scores_cspa": e1, "scores_csea": e2})


def test_supervised_loss_is_lambda_s_combination_of_soft_margin_losses():
    head = CoAttentionHead(29, "supervised")
    out, batch = fake_output(), batch_for()
    target = F.one_hot(batch["labels"], 29).float().reshape(-1, 29)
    l1 = F.multilabel_soft_margin_loss(out.extras["scores_cspa"].reshape(-1, 29), target)
    l2 = F.multilabel_soft_margin_loss(out.extras["scores_csea"].reshape(-1, 29), target)
    assert head.loss(out, batch).item() == pytest.approx(0.3 * l1.item() + 0.7 * l2.item(), rel=1e-5)


def test_weak_loss_max_pools_over_time_and_uses_lambda_w():
    head = CoAttentionHead(29, "weak")
    out, batch = fake_output(1), batch_for()
    target = F.one_hot(batch["video_label"], 29).float()
    v1 = out.extras["scores_cspa"].max(dim=1).values
    v2 = out.extras["scores_csea"].max(dim=1).values
    expected = 0.7 * F.multilabel_soft_margin_loss(v1, target) + 0.3 * F.multilabel_soft_margin_loss(v2, target)
    assert head.loss(out, batch, weak_pool="mean").item() == pytest.approx(expected.item(), rel=1e-5)
    # invalid segments do not enter the max
    batch["valid"][:, -1] = False
    out.extras["scores_cspa"][:, -1] = 100.0
    v1 = out.extras["scores_cspa"][:, :-1].max(dim=1).values
    v2 = out.extras["scores_csea"][:, :-1].max(dim=1).values
    expected = 0.7 * F.multilabel_soft_margin_loss(v1, target) + 0.3 * F.multilabel_soft_margin_loss(v2, target)
    assert head.loss(out, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_single_stream_loss_is_that_streams_loss():
    head = CoAttentionHead(29, "supervised", CoAttentionHead.make_config({"streams": "csea"}))
    torch.manual_seed(0)
    audio, visual = inputs()
    out = head(audio, visual)
    assert set(out.extras) == {"scores_csea", "audio_semantic", "visual_semantic"} and out.spatial is None
    batch = batch_for()
    target = F.one_hot(batch["labels"], 29).float().reshape(-1, 29)
    expected = F.multilabel_soft_margin_loss(out.scores.reshape(-1, 29), target)
    assert head.loss(out, batch).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_both_settings_train_every_parameter_and_fit_a_batch(setting):
    torch.manual_seed(0)
    head = CoAttentionHead(29, setting)
    audio, visual = inputs(b=4, t=3, seed=5)
    batch = batch_for(b=2, t=3)
    batch = {"labels": torch.cat([batch["labels"]] * 2), "video_label": torch.tensor([3, 5, 7, 9]),
             "valid": torch.ones(4, 3, dtype=torch.bool)}
    losses, _ = fit_one_batch(head, audio, visual, batch, lr=1e-3, steps=8)
    assert losses[-1] < losses[0]
    assert head.predict(head(audio, visual)).shape == (4, 3)
