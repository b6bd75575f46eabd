"""Helpers shared by the head tests (test_heads_avltc, test_heads_bmfn, test_heads_coattention):
one torch thread per test, parameter counting from layer sizes, and a few Adam steps on one batch."""
from __future__ import annotations

import pytest
import torch

from train.heads.base import total_loss


@pytest.fixture(autouse=True)
def one_thread():
    """Run the test with one torch thread (restored afterwards); import it into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    """Parameters of ``nn.Linear(n_in, n_out, bias)``."""
    return n_in * n_out + (n_out if bias else 0)


def bilstm(n_in: int, hidden: int) -> int:
    """Parameters of a one-layer bidirectional ``nn.LSTM(n_in, hidden)``.

    Per direction: W_ih 4H x I, W_hh 4H x H, b_ih 4H, b_hh 4H (PyTorch keeps two bias vectors)."""
    return 2 * (4 * hidden * n_in + 4 * hidden * hidden + 8 * hidden)


def fit_one_batch(head, audio: torch.Tensor, visual: torch.Tensor, batch: dict, lr: float, steps: int):
    """``steps`` Adam steps of ``head.loss`` on one batch.

    Asserts at the first step that every parameter gets a non-zero gradient. Returns the loss of
    each step (before its update) and the head's output of the first step."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses, first_out = [], None
    for step in range(steps):
        opt.zero_grad()
        out = head(audio, visual)
        loss = total_loss(head.loss(out, batch))
        loss.backward()
        if step == 0:
            first_out = out
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        opt.step()
        losses.append(loss.item())
    return losses, first_out
