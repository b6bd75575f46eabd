"""The STM head (train/heads/stm.py): parameter count, eq. 1 and eq. 2 against direct formulas,
causality of the memory, the ablations, and localization of a synthetic sounding object."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train import sol_metrics as sol
from train.heads import stm
from train.registry import get_head

from heads_testutils import linear, n_params

torch.set_num_threads(1)


def _conv_bn(i, o):
    return i * o + o + 2 * o  # 1x1 conv with bias, batch norm weight + bias


def test_registered_and_parameter_count():
    assert get_head("stm") is stm.STMHead and stm.STMHead.task == "sol"
    head = stm.STMHead(29)
    D = 256
    expected = (
        _conv_bn(512, 256) + _conv_bn(256, D)  # audio 512 -> 256 -> 256
        + _conv_bn(2048, 1024) + _conv_bn(1024, 512) + _conv_bn(512, D)  # visual 2048 -> 1024 -> 512 -> 256
        + 3 * 2 * linear(D, D)  # three temporal attentions (audio, visual, cross), query + key
        + linear(2 * D, 256) + linear(256, 29)  # classifier
    )
    assert n_params(head) == expected
    uni = stm.STMHead(29, config=stm.STMHead.make_config({"memory": "uni"}))
    none = stm.STMHead(29, config=stm.STMHead.make_config({"memory": "none"}))
    assert n_params(uni) == expected - 2 * linear(D, D)
    assert n_params(none) == expected - 6 * linear(D, D)
    assert stm.STMHead.train_defaults["lr"] == 1e-4 and stm.STMHead.train_defaults["batch_size"] == 128
    assert stm.STMHead.train_defaults["epochs"] == 30


def test_spatial_attention_is_eq1():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, generator=g)
    v = torch.randn(2, 3, 5, 4, 6, generator=g)
    alpha = stm.spatial_attention(a, v)
    for b in range(2):
        for t in range(3):
            logits = np.array([[float(v[b, t, :, i, j] @ a[b, t]) for j in range(6)] for i in range(4)])
            e = np.exp(logits - logits.max())
            np.testing.assert_allclose(alpha[b, t].numpy(), e / e.sum(), rtol=1e-5, atol=1e-7)


def test_temporal_attention_is_eq2_with_causal_window():
    torch.manual_seed(0)
    att = stm.TemporalAttention(dim=4, memory_size=2, pool="max")
    cur = torch.randn(1, 5, 4, 3, 3)
    mem = torch.randn(1, 5, 4, 3, 3)
    out, weights = att(cur, mem)
    Wq, bq, Wk, bk = att.query.weight, att.query.bias, att.key.weight, att.key.bias
    pooled_c = cur.flatten(-2).amax(-1)[0]  # T, C
    pooled_m = mem.flatten(-2).amax(-1)[0]
    for t in range(5):
        q = Wq @ pooled_c[t] + bq
        steps = [t - k for k in range(3) if t - k >= 0]
        keys = [Wk @ (pooled_c[s] if s == t else pooled_m[s]) + bk for s in steps]
        logits = torch.stack([q @ k for k in keys]) / math.sqrt(4)
        w = logits.softmax(0)
        expected = sum(w[i] * (cur[0, s] if s == t else mem[0, s]) for i, s in enumerate(steps))
        torch.testing.assert_close(out[0, t], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights[0, t, : len(steps)], w, rtol=1e-5, atol=1e-6)
        assert float(weights[0, t, len(steps):].detach().sum()) == 0.0
    assert float(weights[0, 0, 0].detach()) == 1.0  # the first step only sees itself


def _inputs(B=2, T=5, Cv=12, Ca=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 6, 4, Ca, generator=g), torch.randn(B, T, 8, 8, Cv, generator=g)


@pytest.mark.parametrize("memory", ["cross+uni", "uni", "none"])
def test_memory_is_causal_and_ablations_isolate_steps(memory):
    torch.manual_seed(0)
    cfg = stm.STMHead.make_config({"visual_channels": 12, "audio_channels": 6, "dim": 8, "hidden": 8, "memory": memory, "memory_size": 1})
    head = stm.STMHead(4, config=cfg).eval()
    a, v = _inputs()
    with torch.no_grad():
        base = head(a, v)
        v2 = v.clone()
        v2[:, 2] += torch.randn_like(v2[:, 2])
        changed = head(a, v2)
    diff = (base.scores - changed.scores).abs().amax(dim=(0, 2))
    att_diff = (base.spatial - changed.spatial).abs().flatten(2).amax(-1).amax(0)
    assert base.scores.shape == (2, 5, 4) and base.spatial.shape == (2, 5, 8, 8)
    torch.testing.assert_close(base.spatial.sum((-2, -1)), torch.ones(2, 5))
    assert diff[:2].max() == 0 and att_diff[:2].max() == 0  # the past never sees the future
    assert diff[2] > 0
    if memory == "none":
        assert diff[3:].max() == 0  # every step alone
    else:
        assert diff[3] > 0 and diff[4] == 0  # memory_size 1: step 3 sees step 2, step 4 does not


def test_loss_is_per_timestep_cross_entropy():
    torch.manual_seed(0)
    cfg = stm.STMHead.make_config({"visual_channels": 12, "audio_channels": 6, "dim": 8, "hidden": 8})
    head = stm.STMHead(4, config=cfg)
    a, v = _inputs(T=3)
    out = head(a, v)
    labels = torch.tensor([[0, 1, 3], [2, 2, 3]])
    manual = -sum(out.scores[b, t].log_softmax(-1)[labels[b, t]] for b in range(2) for t in range(3)) / 6
    torch.testing.assert_close(head.loss(out, {"labels": labels}), manual)


# ---------------------------------------------------------------------------------------------
# synthetic sounding object


def _scenes(n, rng, pv, pa, T=4, noise=0.2, anoise=1.0):
    """Two 3x3 objects moving on an 8x8 map: the sounding one carries the visual pattern of the
    class whose audio pattern is in the audio map, the other (silent) one another class's.
    Returns audio [n, T, 6, 4, Ca], visual [n, T, 8, 8, Cv], class [n], gt boxes [n, T, 4]
    on a 64x64 frame."""
    n_cls, Cv = pv.shape
    X = rng.normal(0, noise, (n, T, 8, 8, Cv)).astype(np.float32)
    A = rng.normal(0, anoise, (n, T, 6, 4, pa.shape[1])).astype(np.float32)
    y = rng.integers(0, n_cls, n)
    boxes = np.zeros((n, T, 4))
    for i in range(n):
        silent = (y[i] + rng.integers(1, n_cls)) % n_cls
        while True:
            p1, p2 = rng.integers(0, 6, 2), rng.integers(0, 6, 2)
            if np.abs(p1 - p2).max() >= 4:
                break
        v1, v2 = rng.integers(-1, 2, 2), rng.integers(-1, 2, 2)
        for t in range(T):
            q1, q2 = np.clip(p1 + v1 * t, 0, 5), np.clip(p2 + v2 * t, 0, 5)
            X[i, t, q1[1]:q1[1] + 3, q1[0]:q1[0] + 3] += pv[y[i]]
            X[i, t, q2[1]:q2[1] + 3, q2[0]:q2[0] + 3] += pv[silent]
            boxes[i, t] = [q1[0] * 8, q1[1] * 8, q1[0] * 8 + 24, q1[1] * 8 + 24]
        A[i] += pa[y[i]]
    return A, X, y, boxes


@pytest.mark.slow
def test_head_localizes_synthetic_sounding_object_better_than_centre_box():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    n_cls, Cv, Ca = 4, 32, 16
    pv = rng.normal(0, 1, (n_cls, Cv)).astype(np.float32)
    pa = rng.normal(0, 1, (n_cls, Ca)).astype(np.float32)
    A, X, y, _ = _scenes(1024, rng, pv, pa)
    At, Xt, yt, Bt = _scenes(96, rng, pv, pa)
    cfg = stm.STMHead.make_config({"visual_channels": Cv, "audio_channels": Ca, "dim": 32, "hidden": 32})
    head = stm.STMHead(n_cls + 1, config=cfg)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(150):
        idx = rng.integers(0, len(X), 32)
        out = head(torch.from_numpy(A[idx]), torch.from_numpy(X[idx]))
        loss = head.loss(out, {"labels": torch.from_numpy(np.repeat(y[idx][:, None], 4, 1))})
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        out = head(torch.from_numpy(At), torch.from_numpy(Xt))
    att = out.spatial.numpy()
    centre = np.array([20.0, 20.0, 44.0, 44.0])  # a 24x24 box in the middle of the 64x64 frame
    cious, ious, centre_ious, centre_cious = [], [], [], []
    for i in range(len(Xt)):
        for t in range(4):
            s = sol.evaluate_frame(att[i, t], Bt[i, t][None], (64, 64), eval_size=None)
            cious.append(s.ciou)
            ious.append(s.iou)
            centre_ious.append(sol.box_iou(centre, Bt[i, t]))
            centre_map = sol.boxes_mask(centre[None], (64, 64)).astype(np.float32)
            centre_cious.append(sol.ciou(centre_map, sol.boxes_mask(Bt[i, t][None], (64, 64))))
    ours = sol.summarize(cious, ious)
    base = sol.summarize(centre_cious, centre_ious)
    print("stm:", ours, "centre box:", base)
    assert (out.scores.argmax(-1).numpy() == yt[:, None]).mean() > 0.9
    assert ours["mean_iou"] > 2 * base["mean_iou"], (ours, base)
    assert ours["iou@0.5"] > base["iou@0.5"] + 0.1, (ours, base)
    assert ours["mean_ciou"] > 2 * base["mean_ciou"], (ours, base)
