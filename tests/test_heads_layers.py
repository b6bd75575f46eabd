"""Shared head layers: the gated per-segment rule (BMFN, CMRAN, CMBS, CACE-Net) against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.heads.layers import gated_predict, gated_segment_scores

C = 6


def numpy_rule(is_event: np.ndarray, event: np.ndarray, inclusive: bool) -> np.ndarray:
    """sigmoid(is_event) >= / > 0.5 -> argmax event (over its K columns), else background C - 1."""
    prob = 1.0 / (1.0 + np.exp(-is_event.astype(np.float64)))
    gate = prob >= 0.5 if inclusive else prob > 0.5
    return np.where(gate, event.argmax(-1)[:, None], C - 1)


def numpy_scores(is_event: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Foreground c: log s + log p_c - max log p; background: log(1 - s) (K = C: max with its own column)."""
    x, e = is_event.astype(np.float64), event.astype(np.float64)
    log_p = e - e.max(-1, keepdims=True) - np.log(np.exp(e - e.max(-1, keepdims=True)).sum(-1, keepdims=True))
    fg = -np.logaddexp(0, -x)[..., None] + (log_p - log_p.max(-1, keepdims=True))[:, None, :]
    bg = -np.logaddexp(0, x)[..., None]
    if e.shape[-1] == C - 1:
        return np.concatenate([fg, bg], -1)
    return np.concatenate([fg[..., :C - 1], np.maximum(bg, fg[..., C - 1:])], -1)


@pytest.mark.parametrize("k", [C - 1, C])
@pytest.mark.parametrize("inclusive", [True, False])
def test_gated_rule_matches_numpy(k, inclusive):
    g = torch.Generator().manual_seed(k + 10 * inclusive)
    is_event = torch.randn(4, 9, generator=g)
    is_event[:, ::3] = 0.0  # sigmoid exactly 0.5: the tie the two thresholds decide differently
    event = torch.randn(4, k, generator=g)
    if k == C:
        event[0, C - 1] = 5.0  # background is the best class of one video
    x, e = is_event.numpy(), event.numpy()

    pred = gated_predict(is_event, event, C, inclusive=inclusive)
    assert pred.dtype == torch.long and pred.shape == (4, 9)
    np.testing.assert_array_equal(pred.numpy(), numpy_rule(x, e, inclusive))

    scores = gated_segment_scores(is_event, event, C)
    assert scores.shape == (4, 9, C)
    np.testing.assert_allclose(scores.numpy(), numpy_scores(x, e), rtol=1e-5, atol=1e-6)
    # argmax = the rule off the ties; at a tie argmax takes the first maximum, i.e. the inclusive rule
    tie = x == 0
    argmax = scores.argmax(-1).numpy()
    np.testing.assert_array_equal(argmax[~tie], numpy_rule(x, e, inclusive)[~tie])
    np.testing.assert_array_equal(argmax, numpy_rule(x, e, True))
    # both branches and both threshold semantics are exercised
    assert (pred.numpy() == C - 1).any() and (pred.numpy() != C - 1).any()
    assert (numpy_rule(x, e, True) != numpy_rule(x, e, False)).any()


def test_gated_rule_rejects_other_class_counts():
    with pytest.raises(ValueError, match="classes"):
        gated_segment_scores(torch.zeros(1, 2), torch.zeros(1, C + 1), C)
    with pytest.raises(ValueError, match="classes"):
        gated_predict(torch.zeros(1, 2), torch.zeros(1, C - 2), C, inclusive=True)
