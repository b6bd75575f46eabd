"""train.loop: schedule resolution, seeding, model selection, learning above chance."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from extract.core.settings import load_pipeline
from train.data import load_task_data
from train.evaluate import evaluate_split
from train.loop import TEST_SELECTION_LABEL, fit, resolve_schedule, seed_everything
from train.protocol import Protocol, resolve_protocol
from train.tasks.avel_task import AvelTask
from train_testutils import LinearTestHead, make_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = make_dataset(tmp_path_factory.mktemp("loop"), T=10, sizes=(24, 9, 9))
    d["data"] = load_task_data(d["store"], d["manifests"])
    return d


def train_cfg(**kw):
    return dataclasses.replace(load_pipeline(search=False).train, **kw)


def run_fit(ds, seed=0, **kw):
    cfg = train_cfg(**kw)
    seed_everything(seed)
    model = LinearTestHead(4, cfg.setting)
    schedule = resolve_schedule(cfg, LinearTestHead)
    return model, fit(model, AvelTask(ds["data"], cfg), schedule, seed)


def test_schedule_takes_head_defaults_for_null_fields():
    s = resolve_schedule(train_cfg(), LinearTestHead)
    assert (s.lr, s.batch_size, s.epochs) == (0.05, 8, 3)
    assert s.source["lr"].endswith("default") and s.lr_step is None and s.weight_decay == 0.0
    s = resolve_schedule(train_cfg(lr=0.5, epochs=7, lr_step=2, lr_gamma=0.5), LinearTestHead)
    assert (s.lr, s.batch_size, s.epochs, s.lr_step, s.lr_gamma) == (0.5, 8, 7, 2, 0.5)
    assert s.source["lr"] == "config" and s.source["batch_size"].endswith("default")
    assert "lr=0.5 (config)" in s.describe()


def test_weak_setting_takes_the_heads_weak_schedule():
    from train.heads.avel import SUPERVISED_SCHEDULE, WEAK_SCHEDULE
    from train.registry import get_head

    dmrn = get_head("dmrn")
    weak = resolve_schedule(train_cfg(setting="weak"), dmrn)
    sup = resolve_schedule(train_cfg(setting="supervised"), dmrn)
    assert weak.epochs == WEAK_SCHEDULE["epochs"] and sup.epochs == SUPERVISED_SCHEDULE["epochs"]
    assert weak.epochs != sup.epochs
    # a head without a weak schedule falls back to its train_defaults
    assert resolve_schedule(train_cfg(setting="weak"), LinearTestHead).epochs == 3


def test_same_seed_same_run_other_seed_differs(ds):
    _, a = run_fit(ds, seed=3, epochs=2)
    _, b = run_fit(ds, seed=3, epochs=2)
    _, c = run_fit(ds, seed=4, epochs=2)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a.epochs) == strip(b.epochs)
    for k in a.best_state:
        assert torch.equal(a.best_state[k], b.best_state[k])
    assert not torch.equal(a.best_state["fc.weight"], c.best_state["fc.weight"])


def test_selects_best_val_epoch_and_beats_chance(ds):
    model, res = run_fit(ds, seed=0, epochs=6, lr=0.2)
    val_acc = [r["val_accuracy"] for r in res.epochs]
    assert res.best_epoch == int(np.argmax(val_acc)) + 1  # earliest maximum
    assert res.selection == "val"
    # the final val evaluation uses the selected weights -> reproduces that epoch's val accuracy
    assert res.results["val"].accuracy == pytest.approx(max(val_acc))
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.best_state[k])
    # test evaluated once, with the selected weights
    assert "test_accuracy" not in res.epochs[0]
    labels = ds["data"].splits["test"].labels.numpy()
    majority = np.bincount(labels.ravel()).max() / labels.size
    assert res.results["test"].accuracy > majority + 0.15
    assert res.results["test"].total == 9 * 10


def test_select_on_test_is_labelled_and_last_keeps_final_weights(ds):
    _, res = run_fit(ds, seed=0, epochs=3, select_on="test")
    assert res.selection == TEST_SELECTION_LABEL
    assert "test_accuracy" in res.epochs[0] and "val_accuracy" not in res.epochs[0]
    assert res.results["test"].accuracy == pytest.approx(max(r["test_accuracy"] for r in res.epochs))
    model, res = run_fit(ds, seed=0, epochs=3, select_on="last")
    assert res.best_epoch == 3 and res.selection == "last"
    direct = evaluate_split(model, ds["data"].bank, ds["data"].splits["test"], 4)
    assert res.results["test"].accuracy == direct.accuracy


def test_step_decay_per_epoch(ds):
    _, res = run_fit(ds, seed=0, epochs=5, lr=0.08, lr_step=2, lr_gamma=0.5, eval_every=2)
    assert [r["lr"] for r in res.epochs] == pytest.approx([0.08, 0.08, 0.04, 0.04, 0.02])
    # evaluated every 2 epochs and at the last epoch
    assert [("val_accuracy" in r) for r in res.epochs] == [False, True, False, True, True]


def test_protocol_sets_order_cadence_and_keep_rule(ds):
    """A protocol passed to fit decides which epochs are evaluated (here 2 and 5 of 6, not the
    last), the split selected on, the batch order of the task (fixed, partial batch dropped) and
    the replacement rule; the default protocol is train.shuffle / select_on / eval_every."""
    cfg = train_cfg(epochs=6, lr=0.05)
    protocol = Protocol("reference", script="a test script", shuffle=False, drop_last=True, select_on="test",
                        eval_first=2, eval_every=3, eval_last=False, keep="better_or_equal")
    seed_everything(0)
    model = LinearTestHead(4, cfg.setting)
    task = AvelTask(ds["data"], cfg)
    seen: list[list[int]] = []
    own = task.train_batches
    task.train_batches = lambda *a: (seen.append(b["index"].tolist()) or b for b in own(*a))
    res = fit(model, task, resolve_schedule(cfg, LinearTestHead), 0, protocol=protocol)
    assert [r["epoch"] for r in res.epochs if "test_accuracy" in r] == [2, 5]
    assert not any("val_accuracy" in r for r in res.epochs)
    scores = {r["epoch"]: r["test_accuracy"] for r in res.epochs if "test_accuracy" in r}
    assert res.best_epoch == (5 if scores[5] >= scores[2] else 2)
    assert res.protocol is protocol and res.selection == TEST_SELECTION_LABEL
    # 24 training samples in batches of 8, in the manifest's order every epoch
    assert seen == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [16, 17, 18, 19, 20, 21, 22, 23]] * 6
    # the default protocol follows the train section
    assert resolve_protocol(train_cfg(shuffle=False, eval_every=4), LinearTestHead) == Protocol(
        "avel", shuffle=False, select_on="val", eval_first=4, eval_every=4, eval_last=True)
    with pytest.raises(ValueError, match="evaluates test first after epoch 2"):
        fit(model, task, resolve_schedule(train_cfg(epochs=1), LinearTestHead), 0, protocol=protocol)


def test_weak_setting_learns_from_video_labels(ds):
    _, res = run_fit(ds, seed=0, epochs=8, lr=0.05, setting="weak", weak_pool="mean")
    labels = ds["data"].splits["test"].labels.numpy()
    pred = res.results["test"].predictions
    event = labels != 3
    # trained on video labels only, event segments are classified per segment far above 1/3 chance
    assert (pred[event] == labels[event]).mean() > 0.9
    assert res.epochs[-1]["train_loss"] < res.epochs[0]["train_loss"]


class TermsHead(LinearTestHead):
    """LinearTestHead whose loss has named parts and changes with the epoch (for the loop's
    loss-term columns and the start_epoch hook)."""

    train_defaults = {"lr": 0.05, "batch_size": 8, "epochs": 3, "milestones": (1, 3), "lr_gamma": 0.5, "grad_clip": 1e-3}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls: list[tuple[int, int]] = []

    def start_epoch(self, epoch, epochs):
        self.calls.append((epoch, epochs))

    def loss(self, out, batch, weak_pool="mean"):
        ce = super().loss(out, batch, weak_pool)
        aux = out.scores.pow(2).mean()
        weight = float(len(self.calls))  # the aux term grows with the epoch: 1, 2, 3
        return {"loss": ce + weight * aux, "ce": ce, "aux": aux}


def test_milestones_clipping_loss_terms_and_epoch_hook(ds):
    cfg = train_cfg()
    schedule = resolve_schedule(cfg, TermsHead)
    assert schedule.milestones == (1, 3) and schedule.lr_step is None and schedule.grad_clip == 1e-3
    seed_everything(0)
    model = TermsHead(4, "supervised")
    res = fit(model, AvelTask(ds["data"], cfg), schedule, 0)
    # MultiStepLR: lr halves after epochs 1 and 3 (per epoch, not per batch)
    assert [r["lr"] for r in res.epochs] == pytest.approx([0.05, 0.025, 0.025])
    assert model.calls == [(1, 3), (2, 3), (3, 3)]
    for row in res.epochs:
        assert set(row) >= {"train_loss", "train_ce", "train_aux", "clipped_steps"}
        assert row["clipped_steps"] == 1.0  # every gradient of this loss is far above 1e-3
    # train_loss = ce + epoch * aux for each batch, so the epoch means obey the same sum
    for epoch, row in enumerate(res.epochs, start=1):
        assert row["train_loss"] == pytest.approx(row["train_ce"] + epoch * row["train_aux"], rel=1e-5)


def test_schedule_config_overrides_the_other_decay_of_the_head():
    s = resolve_schedule(train_cfg(lr_step=2), TermsHead)
    assert s.lr_step == 2 and s.milestones is None and s.source["milestones"].startswith("config")
    s = resolve_schedule(train_cfg(milestones=[]), TermsHead)
    assert s.milestones is None and s.lr_step is None
    s = resolve_schedule(train_cfg(grad_clip=0), TermsHead)
    assert s.grad_clip is None
    with pytest.raises(ValueError, match="either lr_step"):
        resolve_schedule(train_cfg(lr_step=2, milestones=[3]), LinearTestHead)
    with pytest.raises(ValueError, match="increasing"):
        resolve_schedule(train_cfg(milestones=[3, 2]), LinearTestHead)


def test_loss_dict_needs_its_total():
    from train.heads.base import split_loss

    total, terms = split_loss(torch.tensor(2.0))
    assert float(total) == 2.0 and terms == {}
    with pytest.raises(ValueError, match="'loss'"):
        split_loss({"ce": torch.tensor(1.0)})
