"""Cross-modality localization: window search, metric, chance level, and the CML heads' contract
(shapes, finiteness, gradients, determinism, parameter counts, losses against hand formulas)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from extract.core.manifest import Sample
from train import cml_metrics as cml
from train.registry import get_head, head_names

from heads_testutils import linear, n_params

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# window search


def brute_force_start(dist: np.ndarray, onset: int, length: int) -> int:
    """Loop version of Tian et al. eq. 8: first t with the smallest cumulative distance."""
    T = dist.shape[0]
    best_t, best = None, math.inf
    for t in range(T - length + 1):
        total = 0.0
        for s in range(length):
            total += float(dist[onset + s, t + s])
        if total < best:
            best_t, best = t, total
    return best_t


def test_window_search_matches_brute_force_on_random_matrices():
    rng = np.random.default_rng(0)
    checked = 0
    for T in (2, 5, 10):
        for _ in range(30):
            dist = rng.random((T, T))
            length = int(rng.integers(1, T))
            onset = int(rng.integers(0, T - length + 1))
            assert cml.search_start(dist, onset, length) == brute_force_start(dist, onset, length)
            scores = cml.window_scores(dist, onset, length)
            assert scores.shape == (T - length + 1,)
            expected = [sum(dist[onset + s, t + s] for s in range(length)) for t in range(T - length + 1)]
            np.testing.assert_allclose(scores, expected, rtol=1e-12)
            checked += 1
    assert checked == 90


def test_window_search_ties_take_the_first_start():
    dist = np.ones((4, 4))
    assert cml.search_start(dist, 1, 2) == 0  # all windows score 2: np.argmin -> first


def test_window_search_hand_case():
    # query rows 2..3 (l = 2) of a 4x4 matrix; windows t = 0, 1, 2
    dist = np.array(
        [
            [9, 9, 9, 9],
            [9, 9, 9, 9],
            [5, 1, 7, 3],
            [2, 8, 4, 6],
        ],
        dtype=float,
    )
    # t=0: d[2,0]+d[3,1] = 5+8 = 13; t=1: d[2,1]+d[3,2] = 1+4 = 5; t=2: d[2,2]+d[3,3] = 7+6 = 13
    np.testing.assert_array_equal(cml.window_scores(dist, 2, 2), [13, 5, 13])
    assert cml.search_start(dist, 2, 2) == 1


def test_predict_starts_a2v_uses_rows_v2a_uses_columns():
    T = 4
    dist = np.full((T, T), 10.0)
    # audio rows 1..2 match visual columns 2..3 (A2V answer: 2)
    dist[1, 2] = dist[2, 3] = 0.0
    # visual rows (columns of dist) 1..2 match audio rows 0..1 (V2A answer: 0)
    dist[0, 1] = dist[1, 2] = 0.0
    preds = cml.predict_starts(dist[None], [1], [2])
    assert preds["a2v"].tolist() == [2]
    # V2A query = visual 1..2: windows over audio t: d[t,1] + d[t+1,2]; t=0: 0+0 = 0
    assert preds["v2a"].tolist() == [0]


def test_window_search_rejects_queries_outside_the_video():
    with pytest.raises(ValueError, match="does not fit"):
        cml.window_scores(np.zeros((4, 4)), 3, 2)
    with pytest.raises(ValueError, match="square"):
        cml.window_scores(np.zeros((4, 3)), 0, 1)


# ---------------------------------------------------------------------------------------------
# metric and chance


def test_exact_match_accuracy_hand_cases():
    assert cml.exact_match_accuracy([0, 3, 2, 5], [0, 3, 1, 4]) == 50.0
    assert cml.exact_match_accuracy([1], [1]) == 100.0
    assert cml.exact_match_accuracy([1, 2, 3], [0, 0, 0]) == 0.0
    with pytest.raises(ValueError):
        cml.exact_match_accuracy([], [])


def test_chance_level_by_hand():
    # T = 10: l = 9 -> 1/2, l = 5 -> 1/6, l = 1 -> 1/10; mean = (0.5 + 1/6 + 0.1) / 3
    expected = 100.0 * (0.5 + 1.0 / 6.0 + 0.1) / 3.0
    assert cml.chance_accuracy([9, 5, 1], 10) == pytest.approx(expected)
    assert cml.chance_accuracy([1, 1], 10) == pytest.approx(10.0)  # Xue et al.: 10% for T = 10
    with pytest.raises(ValueError):
        cml.chance_accuracy([11], 10)


def test_cml_metrics_on_planted_matches():
    T = 6
    onsets, lengths = [1, 0, 3], [2, 5, 1]
    dist = np.full((3, T, T), 5.0)
    # sample 0: audio 1..2 sits at visual 1..2 (correct both ways via the diagonal)
    dist[0, 1, 1] = dist[0, 2, 2] = 0.0
    # sample 1: nothing planted: all windows tie, argmin 0 == onset 0 (correct both ways)
    # sample 2: audio 3 matches visual 5 and visual 3 matches audio 3? plant only d[3,5] = 0
    dist[2, 3, 5] = 0.0
    m = cml.cml_metrics(dist, onsets, lengths)
    # A2V: sample 2 predicts 5 (wrong) -> 2/3; V2A: column 3 of sample 2 is flat -> argmin 0 (wrong)
    assert m["a2v_acc"] == pytest.approx(200.0 / 3.0)
    assert m["v2a_acc"] == pytest.approx(200.0 / 3.0)
    assert m["chance_acc"] == pytest.approx(100.0 * (1 / 5 + 1 / 2 + 1 / 6) / 3)
    assert m["num_samples"] == 3


def test_queries_keep_only_events_shorter_than_the_video():
    T = 10

    def sample(i, onset, offset, category="dog", video=None):
        return Sample(f"s{i}", video or f"v{i}", f"v{i}.mp4", category, onset, offset, "test")

    samples = [
        sample(0, 0, 10),  # whole video: skipped
        sample(1, 2, 5),  # l = 3
        sample(2, 0, 0, category=""),  # no event: skipped
        sample(3, 7, 12),  # clipped to 7..10: l = 3
        sample(4, 4, 4),  # empty: skipped
    ]
    queries = cml.cml_queries(samples, T)
    assert [(q.sample_id, q.onset, q.length) for q in queries] == [("s1", 2, 3), ("s3", 7, 3)]


def test_match_labels_union_events_of_one_video():
    def sample(i, onset, offset, video):
        return Sample(f"s{i}", video, "x.mp4", "dog", onset, offset, "train")

    labels = cml.match_labels([sample(0, 1, 3, "a"), sample(1, 6, 8, "a"), sample(2, 0, 10, "b")], 10)
    np.testing.assert_array_equal(labels["a"], [0, 1, 1, 0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(labels["b"], np.ones(10))


# ---------------------------------------------------------------------------------------------
# heads of task "cml": the contract every one of them keeps

CML_HEADS = head_names("cml")
B, T = 3, 5


def make_head(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = get_head(name)
    return cls(num_classes=29, setting="supervised", config=cls.make_config({}))


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, T, 128, generator=g)
    visual = torch.rand(B, T, 7, 7, 512, generator=g)
    match = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.float32)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, 4] = False
    return audio, visual, {"match": match, "valid": valid}


def test_cml_heads_are_registered():
    assert {"avdln", "dcca"} <= set(CML_HEADS)
    for name in CML_HEADS:
        cls = get_head(name)
        assert cls.task == "cml" and "supervised" in cls.settings


@pytest.mark.parametrize("name", CML_HEADS)
def test_cml_head_shapes_finite_and_distance_matrix(name):
    head = make_head(name)
    audio, visual, batch = inputs()
    out = head(audio, visual)
    S = len(head.stream_weights())
    assert out.audio.dim() == 4 and out.audio.shape[:3] == (B, S, T)
    assert out.visual.shape == out.audio.shape
    assert torch.isfinite(out.audio).all() and torch.isfinite(out.visual).all()
    dist = head.distance_matrix(out)
    assert dist.shape == (B, T, T)
    # entry (i, j) = mean over streams of ||audio_i - visual_j||, computed independently
    ref = torch.stack(
        [torch.cdist(out.audio[:, s], out.visual[:, s]) for s in range(S)], dim=1
    ).mean(dim=1)
    torch.testing.assert_close(dist, ref, rtol=1e-4, atol=1e-4)
    loss = head.loss(out, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", CML_HEADS)
def test_cml_head_gradients_reach_every_parameter(name):
    head = make_head(name)
    head.train()
    audio, visual, batch = inputs()
    head.loss(head(audio, visual), batch).backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", CML_HEADS)
def test_cml_head_is_deterministic(name):
    audio, visual, batch = inputs()
    a, b = make_head(name, seed=3).eval(), make_head(name, seed=3).eval()
    with torch.no_grad():
        oa, ob = a(audio, visual), b(audio, visual)
    torch.testing.assert_close(oa.audio, ob.audio, rtol=0, atol=0)
    torch.testing.assert_close(oa.visual, ob.visual, rtol=0, atol=0)
    assert torch.equal(a.loss(oa, batch), b.loss(ob, batch))


def test_avdln_architecture_and_parameter_count():
    head = make_head("avdln")
    # visual 512 -> 128 -> 64, audio 128 -> 128 -> 64 (reference scmm_net)
    expected = (linear(512, 128) + linear(128, 64)) + (linear(128, 128) + linear(128, 64))
    assert n_params(head) == expected
    slopes = [m.negative_slope for m in head.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.3, 0.3]
    assert head.config.margin == 2.0


def test_avdln_forward_by_hand():
    head = make_head("avdln")
    audio, visual, _ = inputs()
    out = head(audio, visual)
    pooled = visual.mean(dim=(2, 3))
    lin1, lin2 = head.visual_net[0], head.visual_net[2]
    h = pooled @ lin1.weight.T + lin1.bias
    h = torch.where(h > 0, h, 0.3 * h)
    torch.testing.assert_close(out.visual[:, 0], h @ lin2.weight.T + lin2.bias, rtol=1e-5, atol=1e-5)
    # pre-pooled visual maps [B, T, 1, 1, 512] give the same embeddings (uses_spatial = False)
    torch.testing.assert_close(head(audio, pooled[:, :, None, None]).visual, out.visual, rtol=1e-5, atol=1e-5)


def test_contrastive_loss_against_hand_formula():
    from train.heads.cml_heads import contrastive_loss

    d = torch.tensor([0.5, 1.0, 2.5, 0.25])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # y=1: 0.25; y=0,d=1: (2-1)^2 = 1; y=0,d=2.5: 0; y=0,d=0.25: 1.75^2 = 3.0625
    assert float(contrastive_loss(d, y, 2.0)) == pytest.approx((0.25 + 1 + 0 + 3.0625) / 4)
    mask = torch.tensor([True, True, False, False])
    assert float(contrastive_loss(d, y, 2.0, mask)) == pytest.approx((0.25 + 1) / 2)


def test_avdln_loss_is_contrastive_loss_of_same_segment_pairs():
    head = make_head("avdln")
    audio, visual, batch = inputs()
    out = head(audio, visual)
    d = (out.audio[:, 0] - out.visual[:, 0]).norm(dim=-1)
    y, m = batch["match"], batch["valid"].float()
    per = y * d**2 + (1 - y) * (2.0 - d).clamp_min(0) ** 2
    torch.testing.assert_close(head.loss(out, batch), (per * m).sum() / m.sum())


def test_cca_correlation_matches_numpy_reference():
    from train.heads.cml_heads import cca_correlation

    rng = np.random.default_rng(0)
    z = rng.standard_normal((200, 2))
    x = np.c_[z[:, 0] + 0.1 * rng.standard_normal(200), rng.standard_normal(200), z[:, 1]]
    y = np.c_[z[:, 1] + 0.5 * rng.standard_normal(200), z[:, 0], rng.standard_normal(200)]
    # numpy: canonical correlations = singular values of Sxx^-1/2 Sxy Syy^-1/2 (no ridge)
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc / 199, yc.T @ yc / 199, xc.T @ yc / 199

    def inv_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(w**-0.5) @ v.T

    sv = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False)
    got = cca_correlation(torch.tensor(x), torch.tensor(y), reg=0.0, components=2)
    assert float(got) == pytest.approx(sv[:2].sum(), rel=1e-9)
    assert sv[0] > 0.9  # the planted shared component is found


def test_dcca_fit_cca_makes_canonical_variates_correlated_and_white():
    cls = get_head("dcca")
    head = cls(num_classes=29, config=cls.make_config({"reg": 1e-8}))
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(400, 64, generator=g)
    a = shared @ torch.randn(64, 64, generator=g) + 0.1 * torch.randn(400, 64, generator=g)
    v = shared @ torch.randn(64, 64, generator=g) + 0.1 * torch.randn(400, 64, generator=g)
    corr = head.fit_cca(a, v)
    za = (a - head.audio_mean) @ head.audio_proj
    zv = (v - head.visual_mean) @ head.visual_proj
    cov_a = za.T @ za / 399
    # whitened (the ridge is negligible here), components uncorrelated, and the per-component
    # correlation of the variates equals the reported canonical correlation
    torch.testing.assert_close(cov_a, torch.eye(64), atol=2e-3, rtol=0)
    per_comp = (za * zv).sum(0) / 399
    torch.testing.assert_close(per_comp, corr, atol=2e-3, rtol=0)
    assert torch.all(corr[:-1] >= corr[1:]) and float(corr[:32].min()) > 0.95  # sorted; shared directions found
    assert bool(head.cca_fitted)


def test_coattention_cml_parameters_are_the_event_heads_minus_classifiers_plus_matching_mlps():
    supervised = get_head("coattention")(29)
    head = make_head("coattention-cml")
    classifier = sum(p.numel() for n, p in supervised.named_parameters() if ".classifier." in n)
    # Xue et al. Fig. 2(b): per stream and modality Dense(256 -> 128) and Dense(128 -> 64)
    matching = 2 * 2 * (linear(256, 128) + linear(128, 64))
    assert n_params(head) == n_params(supervised) - classifier + matching
    assert head.stream_weights() == [0.6, 0.4] and head.config.margin == 2.0


def test_coattention_cml_loss_and_distance_combine_the_two_streams():
    head = make_head("coattention-cml")
    audio, visual, batch = inputs()
    out = head(audio, visual)
    y, m = batch["match"], batch["valid"].float()

    def stream_loss(s):
        d = (out.audio[:, s] - out.visual[:, s]).norm(dim=-1)
        per = y * d**2 + (1 - y) * (2.0 - d).clamp_min(0) ** 2
        return (per * m).sum() / m.sum()

    torch.testing.assert_close(head.loss(out, batch), 0.6 * stream_loss(0) + 0.4 * stream_loss(1))
    # inference: the mean of the CSPA and CSEA distances (Xue et al. sec. III-D)
    d_cspa = torch.cdist(out.audio[:, 0], out.visual[:, 0])
    d_csea = torch.cdist(out.audio[:, 1], out.visual[:, 1])
    torch.testing.assert_close(head.distance_matrix(out), (d_cspa + d_csea) / 2, rtol=1e-4, atol=1e-4)
