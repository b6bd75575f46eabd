"""Resident training (issue 27): the features stay on the training device, an epoch waits for the
device a fixed number of times (not once per batch), a split is evaluated in one pass, a
non-finite loss never updates the weights; and the results equal those of the per-batch loop
avel had before (kept below as it was), seed for seed."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import train.evaluate
import train.loop
from extract.core.settings import load_pipeline
from train.data import iterate_batches, load_task_data
from train.heads.base import split_loss, total_loss
from train.hostsync import HostSyncCounter
from train.loop import NonFiniteError, check_batch_finite, fit, resolve_schedule, seed_everything, train_epoch
from train.registry import get_head
from train.tasks.avel_task import AvelTask
from train_testutils import LinearTestHead, make_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = make_dataset(tmp_path_factory.mktemp("resident"), T=10, sizes=(24, 6, 6))
    d["data"] = load_task_data(d["store"], d["manifests"])
    return d


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = make_dataset(tmp_path_factory.mktemp("resident_small"), T=10, sizes=(8, 3, 3))
    d["data"] = load_task_data(d["store"], d["manifests"])
    return d


def train_cfg(**kw):
    return dataclasses.replace(load_pipeline(search=False).train, **kw)


# ---------------------------------------------------------------------------------------------
# the per-batch loop as it was: train/loop.py train_epoch and train/evaluate.py predict_split at
# commit b8fe0b3 (a host synchronisation per batch: float(loss), float(term), int(hits), the batch
# and loss checks, the predictions copied per batch)


def per_batch_train_epoch(model, optimizer, task, batch_size, generator, rng, epoch=1, grad_clip=None):
    model.train()
    loss_sum, count, correct, total, counted = 0.0, 0, 0, 0, False
    term_sums: dict[str, float] = {}
    steps, clipped = 0, 0
    for index, batch in enumerate(task.train_batches(model, batch_size, generator, rng)):
        check_batch_finite(task, batch, epoch, index)
        out = model(batch["audio"], batch["visual"])
        loss, terms = split_loss(task.loss(model, out, batch))
        if not math.isfinite(float(loss.detach())):
            raise NonFiniteError(f"epoch {epoch}, batch {index}: the training loss is {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            clipped += int(float(norm) > grad_clip)
        optimizer.step()
        steps += 1
        n = int(batch["audio"].shape[0])
        loss_sum += float(loss.detach()) * n
        for name, term in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + float(term.detach()) * n
        count += n
        hits = task.batch_accuracy(model, out, batch)
        if hits is not None:
            counted = True
            correct, total = correct + int(hits[0]), total + hits[1]
    row = {"train_loss": loss_sum / max(count, 1)}
    row.update({f"train_{name}": value / max(count, 1) for name, value in term_sums.items()})
    if grad_clip is not None:
        row["clipped_steps"] = clipped / max(steps, 1)
    if counted:
        row["train_accuracy"] = correct / max(total, 1)
    return row


@torch.no_grad()
def per_batch_predict_split(model, bank, split, batch_size=256, weak_pool="mean"):
    was_training = model.training
    model.eval()
    preds, loss_sum = [], 0.0
    try:
        for batch in iterate_batches(bank, split, batch_size):
            out = model(batch["audio"], batch["visual"])
            loss_sum += float(total_loss(model.loss(out, batch, weak_pool))) * len(batch["index"])
            preds.append(model.predict(out).cpu())
    finally:
        model.train(was_training)
    pred = torch.cat(preds).numpy() if preds else np.zeros((0, bank.segments), np.int64)
    return pred, loss_sum / max(len(split), 1)


class TermsHead(LinearTestHead):
    """A loss with named terms, clipped gradients and a milestone decay (every column of an epoch row)."""

    train_defaults = {"lr": 0.05, "batch_size": 8, "epochs": 3, "milestones": (2,), "lr_gamma": 0.5, "grad_clip": 0.05}

    def loss(self, out, batch, weak_pool="mean"):
        ce = super().loss(out, batch, weak_pool)
        aux = out.scores.pow(2).mean()
        return {"loss": ce + 0.1 * aux, "ce": ce, "aux": aux}


def _fit(data, head, seed, cfg):
    seed_everything(seed)
    model = get_head(head)(num_classes=4, setting=cfg.setting) if isinstance(head, str) else head(4, cfg.setting)
    schedule = resolve_schedule(cfg, type(model))
    return fit(model, AvelTask(data, cfg), dataclasses.replace(schedule, epochs=3, batch_size=8), seed)


@pytest.mark.parametrize("head, setting", [(TermsHead, "supervised"), (LinearTestHead, "weak"), ("dmrn", "supervised")])
def test_resident_training_equals_the_per_batch_loop_seed_for_seed(ds, monkeypatch, head, setting):
    cfg = train_cfg(setting=setting)
    for seed in (0, 1) if isinstance(head, type) else (1,):  # the real head: one seed (CPU time)
        resident = _fit(ds["data"], head, seed, cfg)
        with monkeypatch.context() as m:
            m.setattr(train.loop, "train_epoch", per_batch_train_epoch)
            m.setattr(train.evaluate, "predict_split", per_batch_predict_split)
            before = _fit(ds["data"], head, seed, cfg)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
        assert strip(resident.epochs) == strip(before.epochs)  # exactly: the same sums in the same order
        assert resident.best_epoch == before.best_epoch
        for key, value in before.best_state.items():
            assert torch.equal(resident.best_state[key], value), key
        for role, res in before.results.items():
            got = resident.results[role]
            assert got.loss == res.loss and got.accuracy == res.accuracy
            np.testing.assert_array_equal(got.predictions, res.predictions)
    if head is TermsHead:  # the row has every kind of column, and the clipping really happened
        assert {"train_ce", "train_aux", "clipped_steps", "train_accuracy"} <= set(resident.epochs[0])
        assert 0 < resident.epochs[0]["clipped_steps"] <= 1


# ---------------------------------------------------------------------------------------------
# host synchronisations per epoch do not grow with the number of batches


def count_epoch_syncs(data, head, batch_size: int, fused: bool, grad_clip=None) -> tuple[HostSyncCounter, HostSyncCounter]:
    """Syncs of one training epoch and of one evaluation of the val split (in batches of
    ``batch_size`` too). With torch's default (non-fused) Adam, its step counter is a host tensor
    read with .item() by design (not a device wait): calls inside ``optimizer.step`` are not
    counted then."""
    torch.manual_seed(0)
    cfg = train_cfg()
    model = get_head(head)(num_classes=4, setting="supervised") if isinstance(head, str) else head(4, "supervised")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    task = AvelTask(data, cfg)
    syncs = HostSyncCounter()
    hooks = [] if fused else [register_optimizer_step_pre_hook(lambda *a: syncs.pause()),
                              register_optimizer_step_post_hook(lambda *a: syncs.resume())]
    try:
        with syncs:
            train.loop.train_epoch(model, optimizer, task, batch_size, torch.Generator().manual_seed(0), np.random.default_rng(0),
                        grad_clip=grad_clip)
    finally:
        for hook in hooks:
            hook.remove()
    evaluation = HostSyncCounter()
    with evaluation:
        train.evaluate.evaluate_split(model, data.bank, data.splits["val"], 4, batch_size)
    return syncs, evaluation


def test_the_counter_sees_the_per_batch_loop_wait_every_batch(small, monkeypatch):
    """The instrument itself: the loop as it was waits at least 4 times per batch."""
    monkeypatch.setattr(train.loop, "train_epoch", per_batch_train_epoch)
    few = count_epoch_syncs(small["data"], TermsHead, 8, fused=True, grad_clip=0.05)[0].total
    many = count_epoch_syncs(small["data"], TermsHead, 2, fused=True, grad_clip=0.05)[0].total
    assert many - few >= 4 * (4 - 1)


@pytest.mark.parametrize("fused", [True, False])
def test_an_epoch_waits_for_the_device_once_whatever_the_number_of_batches(small, fused):
    one = count_epoch_syncs(small["data"], TermsHead, 8, fused, grad_clip=0.05)  # 1 batch
    four = count_epoch_syncs(small["data"], TermsHead, 2, fused, grad_clip=0.05)  # 4 batches
    assert one[0].calls == four[0].calls, (one[0].calls, four[0].calls)
    # the epoch order (host -> numpy) and the one read of the epoch's sums
    assert dict(four[0].calls) == {"numpy": 1, "tolist": 1}
    # evaluation: the order, the predictions and the loss at the end, the labels (val: 3 samples in 1 or 2 batches)
    assert one[1].calls == four[1].calls and four[1].total <= 6, four[1].calls


@pytest.mark.parametrize("head", ["dmrn", "a+v-att", "cmbs", "psp"])
def test_the_heads_do_not_wait_for_the_device_inside_a_batch(small, head):
    one = count_epoch_syncs(small["data"], head, 8, fused=True)
    four = count_epoch_syncs(small["data"], head, 2, fused=True)
    assert one[0].calls == four[0].calls and four[0].total <= 2, four[0].calls
    assert one[1].calls == four[1].calls and four[1].total <= 6, four[1].calls


# ---------------------------------------------------------------------------------------------
# a non-finite loss: caught on the device, never trained on, named at the end of the epoch


class PoisonHead(LinearTestHead):
    """Its loss is NaN for a batch holding the sample at split position ``poison``."""

    poison = -1

    def loss(self, out, batch, weak_pool="mean"):
        loss = super().loss(out, batch, weak_pool)
        hit = torch.as_tensor(np.isin(batch["index"], [self.poison]).any())
        return torch.where(hit, torch.full_like(loss, float("nan")), loss)


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_loss_leaves_the_weights_of_the_last_finite_batch(small, fused):
    data, batch_size = small["data"], 2
    order = torch.randperm(len(data.splits["train"]), generator=torch.Generator().manual_seed(0)).tolist()
    bad_batch = 2
    task = AvelTask(data, train_cfg())

    def make():
        torch.manual_seed(0)
        model = PoisonHead(4, "supervised")
        model.poison = order[bad_batch * batch_size + 1]
        return model, torch.optim.Adam(model.parameters(), lr=0.05, fused=fused)

    # what the weights must be: trained on the batches before the bad one only
    model, optimizer = make()
    for index, batch in enumerate(iterate_batches(data.bank, data.splits["train"], batch_size, shuffle=True,
                                                  generator=torch.Generator().manual_seed(0))):
        if index == bad_batch:
            break
        optimizer.zero_grad()
        model.loss(model(batch["audio"], batch["visual"]), batch).backward()
        optimizer.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer = make()
    with pytest.raises(NonFiniteError) as err:
        train_epoch(model, optimizer, task, batch_size, torch.Generator().manual_seed(0), np.random.default_rng(0), epoch=5)
    keys = [data.bank.keys[int(r)] for r in data.splits["train"].rows[order[bad_batch * batch_size:(bad_batch + 1) * batch_size]]]
    assert str(err.value).startswith(f"epoch 5, batch {bad_batch} (videos {', '.join(keys)}): the training loss is nan")
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key  # the batches after it did not train either


@pytest.fixture(scope="module")
def cml_dataset(tmp_path_factory):
    from test_cml_task import build_dataset

    return build_dataset(tmp_path_factory.mktemp("cml_syncs"))


def test_cross_modality_epochs_and_evaluation_wait_once_too(cml_dataset, head="avdln", sizes=(1000, 400)):
    from test_cml_task import pipeline_for

    from train.runner import setup

    task, model, _, _ = setup(pipeline_for(cml_dataset, head), head, 0)
    counts = []
    for batch_size in sizes:  # 1 batch, then 3 (avdln: batches of the 960 training segments of 96 videos)
        syncs = HostSyncCounter()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        with syncs:
            train_epoch(model, optimizer, task, batch_size, torch.Generator().manual_seed(0), np.random.default_rng(0))
        counts.append(dict(syncs.calls))
    assert counts[0] == counts[1] == {"numpy": 1, "tolist": 1}, counts
    evaluation = HostSyncCounter()
    with evaluation:
        task.evaluate(model, "val")  # distances and loss read once (plus the query bookkeeping on the host)
    assert evaluation.total <= 4, evaluation.calls


def test_the_counter_counts_each_kind_of_wait():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        x.sum().item(), float(x[0]), int(x[1]), bool(x.any()), x.tolist(), x.numpy(), x.cpu(), x[x > 2], x.nonzero()
        y = x * 2 + 1  # arithmetic: nothing
        try:
            torch.cuda.synchronize()  # counted (without a CUDA device it then raises)
        except (RuntimeError, AssertionError):
            pass
    assert dict(syncs.calls) == {"item": 1, "__float__": 1, "__int__": 1, "__bool__": 1, "tolist": 1, "numpy": 1,
                                 "cpu": 1, "__getitem__": 1, "nonzero": 1, "cuda.synchronize": 1}
    assert y.shape == x.shape
