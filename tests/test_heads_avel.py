"""The Tian et al. heads beyond reference parity: eq. 4 against a per-sample matrix transcription,
the fusion formulas against hand computations from their weights, the Table 1 / Table 2 heads
in the registry, parameter counts from layer sizes, masks and MIL pooling in the losses, config."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn import functional as F

from extract.core.settings import ConfigError
from train.heads import fusion as fz
from train.heads.avel import POSITIONS, SUPERVISED_SCHEDULE, AvelConfig, FusionConfig, avel_loss
from train.heads.layers import AudioGuidedVisualAttention as AGVA
from train.heads.layers import pool_over_time
from train.registry import get_head, head_names

from heads_testutils import bilstm, linear, n_params

torch.set_num_threads(1)  # tiny tensors: one thread is fastest (no spin-waiting on a busy machine)
C = 29


ATTENTION = linear(128, 512) + linear(512, 512) + 2 * linear(512, 49, False) + 49
CLASSIFIER_1 = linear(256, 64) + linear(64, C)
CLASSIFIER_2 = linear(512, 64) + linear(64, C)
LSTM_A, LSTM_V = bilstm(128, 128), bilstm(512, 128)


# ---------------------------------------------------------------------------------------------
# registry and parameter counts


def test_every_table_cell_is_registered():
    names = set(head_names(task="avel"))
    assert {"a", "v", "v-att", "a+v", "a+v-att", "dmrn", "dmrfe", "concat-late"} <= names
    for method in fz.FUSIONS:
        for position in POSITIONS:
            name = "dmrn" if (method, position) == ("dmrn", "late") else f"{method}-{position}"
            assert name in names, name
            cls = get_head(name)
            assert re.search(r"\[B, ?T, ?C\]", cls.__doc__ or "") and "Table" in cls.__doc__, name
            if name not in ("concat-late",):
                assert (cls.method, cls.position) == (method, position)


@pytest.mark.parametrize("name,expected", [
    ("a", LSTM_A + CLASSIFIER_1),
    ("v", LSTM_V + CLASSIFIER_1),
    ("v-att", ATTENTION + LSTM_V + CLASSIFIER_1),
    ("a+v", LSTM_A + LSTM_V + CLASSIFIER_2),
    ("a+v-att", ATTENTION + LSTM_A + LSTM_V + CLASSIFIER_2),
    ("dmrfe", ATTENTION + LSTM_A + LSTM_V + 2 * 4 * linear(256, 256) + 2 * linear(256, C)),
    ("gmu-late", ATTENTION + LSTM_A + LSTM_V + 3 * 256 * 256 + 256 * 256 + linear(256, C)),
    ("mb-decision", ATTENTION + LSTM_A + LSTM_V + 2 * CLASSIFIER_1 + C * C * C + C + linear(C, C)),
    ("additive-early", ATTENTION + linear(128, 256) + 512 * 256 + bilstm(256, 128) + linear(256, C)),
])
def test_parameter_counts_follow_the_layer_sizes(name, expected):
    assert n_params(get_head(name)(C)) == expected


def test_docstring_counts_are_true():
    for name in ("a", "v", "v-att", "a+v", "a+v-att", "dmrn"):
        count = n_params(get_head(name)(C))
        assert f"{count:,}" in get_head(name).__doc__, name


# ---------------------------------------------------------------------------------------------
# AGVA


def agva_by_matrices(att: AGVA, audio_t, visual_t, paper: bool):
    """Eq. 2-4 for ONE segment with explicit matrices: x = W_f tanh(W_v U_v(v) + (W_a U_a(a)) 1^T).

    visual_t [7, 7, 512] -> v [512 x k]; U_v(v) is d x k; W_v (k x d) U_v(v) is k x k with columns
    = regions. paper=True adds (W_a U_a(a)) 1^T (varies along rows); the reference adds it along
    the region columns instead, i.e. 1 (W_a U_a(a))^T."""
    v = visual_t.reshape(-1, 512).T  # [512, k]
    u_v = torch.relu(att.affine_video.weight @ v + att.affine_video.bias[:, None])  # [d, k]
    u_a = torch.relu(att.affine_audio.weight @ audio_t + att.affine_audio.bias)  # [d]
    m = att.affine_v.weight @ u_v  # [k, k]
    g = att.affine_g.weight @ u_a  # [k]
    ones = torch.ones_like(g)
    m = m + (torch.outer(g, ones) if paper else torch.outer(ones, g))
    x = att.affine_h.weight @ torch.tanh(m)  # [1, k]
    w = torch.softmax(x[0], dim=0)
    return v @ w, w


@pytest.mark.parametrize("axis", ["region", "hidden"])
def test_agva_matches_eq_4_per_segment(axis):
    torch.manual_seed(0)
    att = AGVA(hidden=16, audio_term_axis=axis).double()
    att.xavier_init()
    audio = torch.randn(2, 3, 128, dtype=torch.float64)
    visual = torch.rand(2, 3, 7, 7, 512, dtype=torch.float64)
    attended, weights = att(audio, visual.flatten(2, 3))
    for b in range(2):
        for t in range(3):
            ctx, w = agva_by_matrices(att, audio[b, t], visual[b, t], paper=(axis == "hidden"))
            torch.testing.assert_close(weights[b, t], w)
            torch.testing.assert_close(attended[b, t], ctx)
    # the two conventions really differ
    other = AGVA(hidden=16, audio_term_axis="hidden" if axis == "region" else "region").double()
    other.load_state_dict(att.state_dict())
    assert not torch.allclose(other(audio, visual.flatten(2, 3))[1], weights)


def test_attention_map_is_a_distribution_over_the_grid():
    torch.manual_seed(0)
    head = get_head("v-att")(C).eval()
    out = head(torch.randn(2, 4, 128), torch.rand(2, 4, 7, 7, 512))
    att = out.spatial
    assert att.shape == (2, 4, 7, 7)
    torch.testing.assert_close(att.sum(dim=(2, 3)), torch.ones(2, 4))


def test_modalities_used_by_each_variant():
    torch.manual_seed(0)
    audio, visual = torch.randn(1, 5, 128), torch.rand(1, 5, 7, 7, 512)
    audio2, visual2 = torch.randn(1, 5, 128), torch.rand(1, 5, 7, 7, 512)
    for name, sees_audio, sees_visual in [("a", True, False), ("v", False, True), ("v-att", True, True), ("a+v", True, True)]:
        head = get_head(name)(C).eval()
        base = head(audio, visual).scores
        assert torch.allclose(head(audio2, visual).scores, base) != sees_audio, name
        assert torch.allclose(head(audio, visual2).scores, base) != sees_visual, name


def test_v_pools_the_map_globally():
    """V: a visual map that is constant over the grid equals its spatial mean, so permuting the
    regions of any map must not change V's output (it would for V-att)."""
    torch.manual_seed(0)
    audio, visual = torch.randn(1, 4, 128), torch.rand(1, 4, 7, 7, 512)
    shuffled = visual.flatten(2, 3)[:, :, torch.randperm(49)].reshape_as(visual)
    v = get_head("v")(C).eval()
    torch.testing.assert_close(v(audio, shuffled).scores, v(audio, visual).scores)


# ---------------------------------------------------------------------------------------------
# fusion formulas, each recomputed from the module's weights


def lin(layer, x):
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)


def test_additive_maxpool_gated_concat(pair):
    a, v = pair
    torch.manual_seed(0)
    m = fz.Additive(6, 10, 5).double()
    torch.testing.assert_close(m(a, v), lin(m.proj_a, a) + lin(m.proj_v, v))
    m = fz.MaxPooling(6, 10, 5).double()
    expected = torch.where(lin(m.proj_a, a) > lin(m.proj_v, v), lin(m.proj_a, a), lin(m.proj_v, v))
    torch.testing.assert_close(m(a, v), expected)
    m = fz.Gated(6, 10, 5).double()
    torch.testing.assert_close(m(a, v), lin(m.proj_v, v) / (1 + torch.exp(-lin(m.gate_a, a))))
    m = fz.Concat(6, 10, 5).double()
    torch.testing.assert_close(m(a, v), a @ m.proj.weight[:, :6].T + v @ m.proj.weight[:, 6:].T + m.proj.bias)


def test_bilinear_and_gated_bilinear(pair):
    a, v = pair
    torch.manual_seed(0)
    m = fz.MultimodalBilinear(6, 10, 5).double()
    W, b = m.bilinear.weight, m.bilinear.bias  # [5, 6, 10]
    expected = torch.stack([torch.stack([a[n] @ W[k] @ v[n] for k in range(5)]) for n in range(4)]) + b
    torch.testing.assert_close(m(a, v), expected)
    torch.testing.assert_close(m(a[None], v[None])[0], expected)  # leading dims
    torch.testing.assert_close(m(a, v), m.bilinear(a, v))  # same map as torch's Bilinear
    g = fz.GatedMultimodalBilinear(6, 10, 5).double()
    g.bilinear.load_state_dict(m.bilinear.state_dict())
    torch.testing.assert_close(g(a, v), expected * torch.sigmoid(lin(g.gate_a, a)))


def test_gmu(pair):
    a, v = pair
    torch.manual_seed(0)
    m = fz.GMU(6, 10, 5).double()
    assert all(layer.bias is None for layer in (m.proj_a, m.proj_v, m.gate))
    z = torch.sigmoid(torch.cat([a, v], -1) @ m.gate.weight.T)
    expected = z * torch.tanh(a @ m.proj_a.weight.T) + (1 - z) * torch.tanh(v @ m.proj_v.weight.T)
    torch.testing.assert_close(m(a, v), expected)


def test_mrn_updates_only_the_audio_branch(pair):
    a, v = pair
    torch.manual_seed(0)
    m = fz.MRN(6, 10, 5, blocks=2).double()
    h = a
    for blk in m.blocks:
        ap, vp = blk.audio_path, blk.visual_path
        f = torch.tanh(lin(ap[2], torch.tanh(lin(ap[0], h)))) * torch.tanh(lin(vp[2], torch.tanh(lin(vp[0], v))))
        h = lin(blk.shortcut, h) + f
    torch.testing.assert_close(m(a, v), h)


def test_dmrn_projects_only_when_widths_differ(pair):
    a, v = pair
    torch.manual_seed(0)
    same = fz.DMRN(5, 5, 5)
    assert isinstance(same.proj_a, torch.nn.Identity) and isinstance(same.proj_v, torch.nn.Identity)
    m = fz.DMRN(6, 10, 5).double()
    pa, pv = lin(m.proj_a, a), lin(m.proj_v, v)
    merged = 0.5 * (m.U_v(pv) + m.U_a(pa))
    torch.testing.assert_close(m(a, v), 0.5 * (torch.tanh(pa + merged) + torch.tanh(pv + merged)))
    with pytest.raises(ValueError, match="unknown fusion method"):
        fz.make_fusion("sum", 6, 10, 5)


def test_dmrfe_averages_the_two_branch_probabilities():
    torch.manual_seed(0)
    head = get_head("dmrfe")(C).double().eval()
    audio, visual = torch.randn(2, 5, 128, dtype=torch.float64), torch.rand(2, 5, 7, 7, 512, dtype=torch.float64)
    out = head(audio, visual)
    h_a = head.lstm_audio(audio)
    h_v = head.lstm_video(head.attend_map(audio, visual)[0])
    ba, bv = head.block_audio, head.block_video
    p_a = F.softmax(head.L2_audio(torch.tanh(h_a + 0.5 * (ba.U_a(h_a) + ba.U_v(h_v)))), -1)
    p_v = F.softmax(head.L2_video(torch.tanh(h_v + 0.5 * (bv.U_a(h_a) + bv.U_v(h_v)))), -1)
    torch.testing.assert_close(out.scores.exp(), 0.5 * (p_a + p_v))
    torch.testing.assert_close(out.scores.softmax(-1), 0.5 * (p_a + p_v))
    # training: the mean of the members' own losses (cross-entropy here, by hand), not a loss of the average
    ce = get_head("dmrfe")(C, config=get_head("dmrfe").make_config({"loss": "ce"})).double()
    ce.load_state_dict(head.state_dict())
    labels = torch.randint(0, C, (2, 5))
    batch = {"labels": labels, "video_label": labels[:, 0], "valid": torch.ones(2, 5, dtype=torch.bool)}
    nll = lambda p: -torch.log(p.gather(-1, labels.unsqueeze(-1))).mean()  # noqa: E731
    torch.testing.assert_close(ce.loss(ce.eval()(audio, visual), batch), 0.5 * (nll(p_a) + nll(p_v)))


def test_decision_fusion_fuses_the_per_modality_scores():
    """additive-decision = L2(W_a m_a + W_v m_v) with m_* the A / V-att classifiers' logits."""
    torch.manual_seed(0)
    head = get_head("additive-decision")(C).double().eval()
    audio, visual = torch.randn(2, 5, 128, dtype=torch.float64), torch.rand(2, 5, 7, 7, 512, dtype=torch.float64)
    m_a = head.classifier_audio(head.lstm_audio(audio))
    m_v = head.classifier_video(head.lstm_video(head.attend_map(audio, visual)[0]))
    fused = lin(head.fusion.proj_a, m_a) + lin(head.fusion.proj_v, m_v)
    torch.testing.assert_close(head(audio, visual).scores, lin(head.L2, fused))


def test_early_fusion_is_before_the_lstm():
    """Early heads have ONE BiLSTM over the fused features; its input width is fusion_dim."""
    head = get_head("gmu-early")(C, config=FusionConfig(fusion_dim=48))
    assert head.lstm.input_size == 48 and not hasattr(head, "lstm_audio")
    assert head.fusion.proj_a.in_features == 128 and head.fusion.proj_v.in_features == 512


# ---------------------------------------------------------------------------------------------
# losses, pooling, masks


def test_pool_over_time_mean_and_max_with_mask():
    scores = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [100.0, 100.0]]])  # [1, 3, 2]
    valid = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pool_over_time(scores, valid, "mean"), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(pool_over_time(scores, valid, "max"), torch.tensor([[3.0, 5.0]]))
    torch.testing.assert_close(pool_over_time(scores, None, "max"), torch.tensor([[100.0, 100.0]]))
    with pytest.raises(ValueError, match="weak_pool"):
        pool_over_time(scores, valid, "median")


@pytest.mark.parametrize("kind", ["reference", "ce"])
def test_invalid_segments_are_left_out_of_the_loss(kind):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, C, generator=g)
    labels = torch.randint(0, C, (2, 6), generator=g)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    padded = labels.clone()
    padded[1, 4:] = -100  # whatever a loader puts there
    got = avel_loss(scores, {"labels": padded, "valid": valid}, "supervised", "mean", kind)
    kept_scores = torch.cat([scores[0], scores[1, :4]])
    kept_labels = torch.cat([labels[0], labels[1, :4]])
    if kind == "ce":
        expected = F.cross_entropy(kept_scores, kept_labels)
    else:
        expected = torch.nn.MultiLabelSoftMarginLoss()(kept_scores.softmax(-1), F.one_hot(kept_labels, C).float())
    torch.testing.assert_close(got, expected)


def test_weak_ce_is_nll_of_softmax_of_mean_logits():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 10, C, generator=g)
    video_label = torch.tensor([0, 5, 28])
    got = avel_loss(scores, {"video_label": video_label, "labels": None}, "weak", "mean", "ce")
    probs = torch.softmax(scores.mean(1), -1)
    expected = -torch.log(probs[torch.arange(3), video_label]).mean()
    torch.testing.assert_close(got, expected)


def test_unknown_loss_kind_is_an_error():
    with pytest.raises(ValueError, match="loss must be"):
        avel_loss(torch.zeros(1, 2, C), {"labels": torch.zeros(1, 2, dtype=torch.long)}, "supervised", "mean", "hinge")


# ---------------------------------------------------------------------------------------------
# config, inputs, schedule


def test_config_overrides_are_strict_and_change_the_model():
    cls = get_head("dmrn")
    cfg = cls.make_config({"hidden": 32, "fusion_dim": 64})
    head = cls(C, config=cfg)
    assert head.lstm_audio.hidden_size == 32 and head.L2.in_features == 64
    out = head(torch.randn(1, 3, 128), torch.rand(1, 3, 7, 7, 512))
    assert out.scores.shape == (1, 3, C)
    with pytest.raises(ConfigError):
        cls.make_config({"hiden": 32})
    with pytest.raises(ConfigError):
        get_head("a+v-att").make_config({"audio_term_axis": "diagonal"})
    assert isinstance(get_head("a").make_config(), AvelConfig)
    # an option belongs only to the heads that use it
    for name, option in (("gmu-early", "classifier_hidden"), ("dmrn", "classifier_hidden"), ("dmrfe", "classifier_hidden"),
                         ("gmu-decision", "fusion_dim"), ("a", "att_dim"), ("a+v", "grid"), ("gmu-late", "blocks")):
        with pytest.raises(ConfigError, match="unknown key"):
            get_head(name).make_config({option: 32})
    assert get_head("gmu-decision").make_config({"classifier_hidden": 32}).classifier_hidden == 32


def test_wrong_input_shapes_name_the_head_and_the_shape():
    head = get_head("a+v-att")(C)
    with pytest.raises(ValueError, match=r"a\+v-att.*visual must be \[B, T, 7, 7, 512\]"):
        head(torch.randn(1, 3, 128), torch.rand(1, 3, 512, 7, 7))
    with pytest.raises(ValueError, match="audio must be"):
        head(torch.randn(1, 3, 64), torch.rand(1, 3, 7, 7, 512))
    with pytest.raises(ValueError, match="supports settings"):
        get_head("dmrn")(C, setting="semi")


def test_schedule_is_the_reference_one():
    # supervised_main.py: Adam 1e-3, batch 64, 300 epochs, StepLR(15000 iterations, 0.1); the
    # AVE train split has 3339 videos and the loop drops the last partial batch
    iterations_per_epoch = 3339 // 64
    assert SUPERVISED_SCHEDULE["lr_step"] == 15000 // iterations_per_epoch
    assert get_head("dmrn").train_defaults == SUPERVISED_SCHEDULE
    weak = get_head("a+v-att").weak_train_defaults
    # weak_supervised_main.py: 250 epochs over 3339 + 178 background videos: decay never reached
    assert weak["epochs"] * ((3339 + 178) // 64) < 15000 and weak["lr_step"] is None
    assert math.isclose(weak["lr"], 1e-3)
