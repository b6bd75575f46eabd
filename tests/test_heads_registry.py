"""One contract test over EVERY registered event-localization head (timm-style), so heads added
later are covered automatically: for each head and each setting it supports, on a tiny learnable
synthetic batch: scores [B, T, C] and finite; ``loss`` reaches every parameter with a finite,
non-zero gradient; the same seed builds the same model (same outputs); and a few Adam steps lower
the loss. Heads of other tasks are skipped."""
from __future__ import annotations

import pytest
import torch

from train.registry import get_head, head_names

torch.set_num_threads(1)  # tiny tensors: one thread is fastest (no spin-waiting on a busy machine)

B, T, C = 2, 10, 29
STEPS = 4


def learnable_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Each video has one event class on a contiguous span, background (C - 1) elsewhere; every
    segment's audio and visual map carry a class prototype plus noise, so labels are learnable."""
    g = torch.Generator().manual_seed(seed)
    proto_a = torch.randn(C, 128, generator=g)
    proto_v = torch.rand(C, 512, generator=g) * 2.0
    labels = torch.full((B, T), C - 1, dtype=torch.long)
    video_label = torch.randint(0, C - 1, (B,), generator=g)
    for b in range(B):
        start = int(torch.randint(0, T - 3, (1,), generator=g))
        labels[b, start:start + 4] = video_label[b]
    audio = proto_a[labels] + 0.3 * torch.randn(B, T, 128, generator=g)
    visual = proto_v[labels][:, :, None, None, :] * (1 + 0.3 * torch.rand(B, T, 7, 7, 512, generator=g))
    valid = torch.ones(B, T, dtype=torch.bool)
    return {"audio": audio, "visual": visual, "labels": labels, "video_label": video_label, "valid": valid,
            "index": torch.arange(B)}


def head_setting_cases():
    return [pytest.param(name, setting, id=f"{name}-{setting}")
            for name in head_names(task="avel") for setting in get_head(name).settings]


def build(name: str, setting: str, seed: int = 0):
    torch.manual_seed(seed)
    return get_head(name)(C, setting)


@pytest.mark.parametrize("name,setting", head_setting_cases())
def test_head_contract(name, setting):
    cls = get_head(name)
    if cls.task != "avel":
        pytest.skip(f"{name} is a {cls.task} head")
    batch = learnable_batch()
    head = build(name, setting)

    # shape, finiteness, predictions
    out = eval_forward(head, batch)
    assert out.scores.shape == (B, T, C)
    assert torch.isfinite(out.scores).all()
    pred = head.predict(out)
    assert pred.shape == (B, T) and pred.dtype == torch.long
    loss_before = float(head.loss(out, batch))

    # same seed -> same weights -> same outputs; another seed -> other weights
    twin = build(name, setting)
    assert torch.equal(eval_forward(twin, batch).scores, out.scores)
    other = build(name, setting, seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(head.parameters(), other.parameters()))
    del twin, other

    # every parameter gets a finite, non-zero gradient from loss; a few Adam steps lower the loss
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    head.train()
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = head.loss(head(batch["audio"], batch["visual"]), batch)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        if step == 0:
            check_gradients(head)
        optimizer.step()
    loss_after = float(head.loss(eval_forward(head, batch), batch))
    assert loss_after < loss_before, f"loss did not decrease: {loss_before:.6f} -> {loss_after:.6f}"


def eval_forward(head, batch):
    head.eval()
    with torch.no_grad():
        return head(batch["audio"], batch["visual"])


def check_gradients(head) -> None:
    params = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    zero = [n for n, p in params if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradient for {zero}"


@pytest.mark.parametrize("name", [n for n in head_names(task="avel") if "weak" in get_head(n).settings])
def test_recorded_weak_pooling_is_the_one_the_loss_applies(name):
    """metrics.json records ``head.weak_pooling(train.weak_pool)``: when a head reports the same
    pooling for both requests its weak loss must not depend on the request, otherwise it must."""
    batch = learnable_batch()
    head = build(name, "weak")
    out = eval_forward(head, batch)
    with torch.no_grad():
        by_request = {pool: float(head.loss(out, batch, pool)) for pool in ("mean", "max")}
    reported = {pool: head.weak_pooling(pool) for pool in ("mean", "max")}
    assert set(reported.values()) <= {"mean", "max"}
    if reported["mean"] == reported["max"]:
        assert by_request["mean"] == by_request["max"], (reported, by_request)
    else:
        assert reported == {"mean": "mean", "max": "max"}
        assert by_request["mean"] != by_request["max"], by_request  # an ignored request gives equal bits
