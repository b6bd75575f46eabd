"""Training parity (issue 29): avel's one training loop trains each head as its reference script does.

The forward-parity tests (tests/test_avel_parity.py, test_psp_parity.py, test_cmbs_parity.py) show
that the heads compute the reference models. Here the reference TRAINING scripts are transcribed
(tests/reference_trainers.py: data loading and batch order, how the loss is applied, optimiser and
scheduler steps, train / eval switches, evaluation cadence and selection, each line cited) and run
beside avel's :func:`train.loop.fit` with ``train.protocol: reference``, from the same weights
(copied through the forward tests' key maps) and in the same batch order, in float64, on a small
synthetic store: per-step losses, the weights after the last step, the evaluated epochs and their
accuracies, the kept epoch and the final test accuracy must agree.

Where the two cannot agree the test says why and checks the reason instead:

- PSP's training target (``segment_avps_gt_batch``) is a buffer the reference never clears, so
  entries of earlier batches leak into later targets; avel computes the intended target. The
  equality is asserted against the transcription with the buffer cleared, and
  :func:`test_psp_reference_buffer_leaks_earlier_targets` shows the leak on the same batches. The
  buffer is also float32 (the script's ``np.float32``): its ``1/n`` entries differ from avel's
  float64 ones by < 3e-8 relative (the losses then agree to ~1e-7 only), so the equality test keeps
  them in float64.
- Batch order: the scripts draw their permutations from Python's ``random`` (PSP) or the torch
  DataLoader's sampler (CMBS, from torch's global generator); avel from the run's generator. The
  equality tests give the transcription avel's permutations (the order is the same kind: a new
  permutation every epoch, the last partial batch dropped for PSP and kept for CMBS, as
  :func:`test_protocol_orders_batches_as_the_scripts` checks).
- The scripts seed torch once at import, before the model is built; avel seeds when training starts.
  The transcription is seeded at the same point as avel, so dropout (PSP, CMBS) draws the same masks.

Pure protocol facts (evaluated epochs, keep rules, learning-rate steps, initial-weight distributions)
are checked over the scripts' full lengths without training.
"""
from __future__ import annotations

import dataclasses
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import reference_trainers as rt
import test_avel_parity as avel_ref
import test_cmbs_parity as cmbs_ref
import test_psp_parity as psp_ref
from extract.core.settings import load_pipeline
from extract.factories.synthetic import make_synthetic
from train.data import BatchOrder, epoch_order, load_task_data
from train.heads.base import split_loss
from train.loop import fit, make_optimizer, resolve_schedule, state_copy, step_decay_per_iteration
from train.protocol import Protocol, resolve_protocol
from train.registry import get_head
from train.tasks.avel_task import AvelTask

torch.set_num_threads(1)  # small tensors: one thread is fastest (no spin-waiting on a busy machine)

C = rt.C
#: 5 training videos in batches of 2: two full batches and a partial one (dropped or kept)
SIZES = {"train": 5, "val": 5, "test": 5}
BATCH = 2
SEED = 7


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The same rows as avel's TaskData and as the reference scripts' h5 arrays."""
    root = tmp_path_factory.mktemp("training-parity")
    written = make_synthetic(root, splits=SIZES, classes=[f"event{k:02d}" for k in range(C - 1)], seed=3,
                             one_modality_share=0.3, rows_per_shard=8)
    return load_task_data(written.store, written.manifests), rt.reference_data(written.store, written.manifests)


def train_cfg(**overrides):
    return dataclasses.replace(load_pipeline(search=False).train, **overrides)


@dataclasses.dataclass
class AvelRun:
    result: object
    step_losses: list
    states: list  # the weights after each epoch


def train_avel(model, data, epochs: int, batch_size: int = BATCH) -> AvelRun:
    """avel's loop with ``train.protocol: reference`` on ``model`` (float64: a forward pre-hook casts
    the batches, which avel gathers as float32 from float16 features, exactly)."""
    cfg = train_cfg(protocol="reference", epochs=epochs, batch_size=batch_size)
    model.register_forward_pre_hook(lambda module, args: tuple(a.double() for a in args))
    task = AvelTask(data, cfg)
    losses: list[float] = []
    own_loss = task.loss

    def loss(m, out, batch):
        value = own_loss(m, out, batch)
        losses.append(float(split_loss(value)[0].detach()))
        return value

    task.loss = loss
    states: list = []
    result = fit(model, task, resolve_schedule(cfg, type(model)), SEED, on_epoch=lambda row: states.append(state_copy(model)))
    return AvelRun(result, losses, states)


def assert_same_training(ref_run: rt.ReferenceRun, ref_model: nn.Module, ours: AvelRun, to_ref_key, initial,
                         loss_rtol: float = 1e-10, weight_atol: float = 1e-9) -> None:
    """Per-step losses, weights after the last step (ours -> reference key map), the evaluated epochs
    and their scores, the kept epoch and the final test accuracy."""
    assert len(ours.step_losses) == len(ref_run.step_losses) > 0
    np.testing.assert_allclose(ours.step_losses, ref_run.step_losses, rtol=loss_rtol, atol=0)
    ref_state = ref_model.state_dict()
    moved = 0.0
    for key, value in ours.states[-1].items():
        expected = ref_state[to_ref_key(key)].reshape(value.shape)
        torch.testing.assert_close(value, expected, rtol=0, atol=weight_atol, msg=lambda m, k=key: f"{k}: {m}")
        moved = max(moved, float((value - initial[key]).abs().max()))
    assert moved > 1e-3  # the weights did change: a real comparison
    split = ours.result.protocol.select_on
    evaluated = {row["epoch"]: row[f"{split}_accuracy"] for row in ours.result.epochs if f"{split}_accuracy" in row}
    assert sorted(evaluated) == sorted(ref_run.evaluations)
    for epoch, score in ref_run.evaluations.items():
        assert evaluated[epoch] == pytest.approx(score, abs=1e-12)
    assert ours.result.best_epoch == ref_run.best_epoch
    assert ours.result.results["test"].accuracy == pytest.approx(ref_run.test_accuracy, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# same start, same order: the same curve


@pytest.mark.slow  # a few epochs of the real-size models on both sides, float64 (~3-10 s each)
@pytest.mark.parametrize("name,factory", [("a+v-att", avel_ref.RefAttNet), ("dmrn", avel_ref.RefTBMRFNet)])
def test_ave_eccv18_supervised_main_and_avel_train_alike(store, name, factory):
    """supervised_main.py: fixed order (train_order.h5 = the manifest's order), len // batch batches,
    val after 0-based epochs 0 and 5 (not after the last, 6), kept when strictly better, test of
    the kept model."""
    data, ref_data = store
    torch.manual_seed(1)
    ref = factory().double()
    torch.manual_seed(2)  # another initialisation: equality must come from the copied weights
    ours = get_head(name)(C).double()
    avel_ref.load_reference_weights(ours, ref)
    initial = state_copy(ours)
    ref_run = rt.ave_eccv18_supervised(ref, ref_data, 7, BATCH, dtype=torch.float64, seed=SEED)
    run = train_avel(ours, data, 7)
    assert len(ref_run.step_losses) == 7 * (SIZES["train"] // BATCH)  # the last partial batch dropped
    assert sorted(ref_run.evaluations) == [1, 6]
    assert_same_training(ref_run, ref, run, avel_ref.ours_to_reference_key, initial)


def psp_pair():
    torch.manual_seed(1)
    ref = psp_ref.RefPspNetFully().double()
    torch.manual_seed(2)
    ours = get_head("psp")(C).double()
    ref_state = ref.state_dict()
    ours.load_state_dict({key: ref_state[psp_ref.reference_key(key)] for key in ours.state_dict()}, strict=True)
    return ours, ref


@pytest.mark.slow  # a few epochs of the real-size models on both sides, float64 (~3-10 s each)
def test_psp_fully_supervised_main_and_avel_train_alike(store):
    """fully_supervised_main.py: a new permutation every epoch (avel's, injected), len // batch
    batches, train mode per epoch (dropout: same masks), test (and val) after 0-based epochs 5, 10,
    kept when at least as good. The AVPS target buffer is cleared per batch and held in float64
    (see the module docstring)."""
    data, ref_data = store
    ours, ref = psp_pair()
    initial = state_copy(ours)
    shuffle = rt.list_shuffle_from(rt.permutations_from(SEED, SIZES["train"]), ref_data.orders["train"].tolist())
    ref_run = rt.psp_fully_supervised(ref, ref_data, 11, BATCH, dtype=torch.float64, seed=SEED, shuffle=shuffle,
                                      clear_avps_buffer=True, avps_dtype=np.float64)
    run = train_avel(ours, data, 11)
    assert len(ref_run.step_losses) == 11 * (SIZES["train"] // BATCH)
    assert sorted(ref_run.evaluations) == [6, 11]
    assert_same_training(ref_run, ref, run, psp_ref.reference_key, initial)


def test_psp_reference_buffer_leaks_earlier_targets(store):
    """The script's AVPS target keeps the entries of earlier batches: with its buffer as written,
    some training targets hold 1/n on segments that are not the video's event (rows that do not sum
    to 1), where avel's target (the same as the cleared buffer's) has 0. That is why the equality
    test clears it, and why avel does not reproduce it."""
    from train.heads.psp import psp_avps_target

    _, ref_data = store
    targets = {}
    for clear in (False, True):
        seen = []
        ds = rt.PSPFullyDataset(ref_data, ref_data.orders["train"], BATCH, clear_avps_buffer=clear,
                                shuffle=rt.list_shuffle_from(rt.permutations_from(SEED, SIZES["train"]),
                                                             ref_data.orders["train"].tolist()))
        for epoch in range(3):
            for i in range(SIZES["train"] // BATCH):
                _, _, labels, segment_label, avps = ds.get_batch(i, i == 0)
                seen.append((labels.clone(), segment_label.clone(), avps.clone().double()))
        targets[clear] = seen
    leaked = 0
    for (labels, segment_label, leaky), (_, _, cleared) in zip(targets[False], targets[True]):
        intended = psp_avps_target(segment_label, torch.ones_like(segment_label, dtype=torch.bool), C, torch.float64)
        torch.testing.assert_close(cleared, intended, rtol=0, atol=3e-8)  # float32 1/n
        stale = (leaky - cleared).abs() > 1e-6
        assert torch.all(cleared[stale] == 0)  # only entries the intended target leaves at 0 differ
        leaked += int(stale.any(dim=1).sum())
    assert leaked > 0  # on these batches some targets are wrong in the script


def cmbs_pair():
    torch.manual_seed(1)
    ref = cmbs_ref.RefSupvMainModel(cmbs_ref.MAIN_JSON).double()
    torch.manual_seed(2)
    ours = get_head("cmbs")(C).double()
    cmbs_ref.load_reference_weights(ours, ref, cmbs_ref.IDLE_SUPERVISED)
    return ours, ref


def switch_off_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0


def dropout_sites(model: nn.Module, *inputs) -> list[tuple[float, int]]:
    """(rate, elements) of every dropout one training forward pass applies: ``nn.Dropout`` modules
    (their input) and the attention-weight dropout of ``nn.MultiheadAttention`` (batch x heads x
    queries x keys weights), sorted."""
    sites, handles = [], []
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            handles.append(module.register_forward_pre_hook(lambda m, args: sites.append((m.p, args[0].numel()))))
        if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            def attention(m, args, kwargs):
                query, key = args[0], args[1]  # time-first [L, B, d], [S, B, d]
                sites.append((m.dropout, query.shape[1] * m.num_heads * query.shape[0] * key.shape[0]))
            handles.append(module.register_forward_pre_hook(attention, with_kwargs=True))
    model.train()
    with torch.no_grad():
        model(*inputs)
    for handle in handles:
        handle.remove()
    return sorted(sites)


def test_cmbs_drops_out_at_the_reference_places():
    """The same dropout rates on the same numbers of elements as supv_main_model (visual 0.2 twice,
    attention weights 0.1 and, in the interaction blocks, 0.2, residuals 0.1). avel applies them to
    batch-first tensors and draws the attention-weight masks inside PyTorch's fused attention, so a
    seeded generator gives other masks than the reference's time-first layers: the training-equality
    test below runs both without dropout."""
    ours, ref = cmbs_pair()
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(3, 10, 128, generator=g, dtype=torch.float64)
    visual = torch.rand(3, 10, 7, 7, 512, generator=g, dtype=torch.float64)
    expected = dropout_sites(ref, visual, audio)
    assert len(expected) == 30 and {p for p, _ in expected} == {0.1, 0.2}
    assert dropout_sites(ours, audio, visual) == expected


@pytest.mark.slow  # a few epochs of the real-size models on both sides, float64 (~3-10 s each)
def test_cmbs_supv_main_and_avel_train_alike(store):
    """supv_main.py: a new permutation every epoch (avel's, through a sampler), the last partial
    batch kept, clip_grad_norm_ 0.5, Adam 7e-4, MultiStepLR after each epoch's evaluation, TEST
    evaluated after every epoch, kept when strictly better; float64 as the script. Dropout is off on
    both sides (masks cannot be aligned, see :func:`test_cmbs_drops_out_at_the_reference_places`).
    Batches of 3 (3 + 2): the script's ``.squeeze()`` (supv_main.py:169-170) fails on a last batch of
    ONE sample (AVE's last batch has 3339 % 64 = 11)."""
    data, ref_data = store
    ours, ref = cmbs_pair()
    switch_off_dropout(ours)
    switch_off_dropout(ref)
    initial = state_copy(ours)
    sampler = rt.EpochPermutations(SIZES["train"], rt.permutations_from(SEED, SIZES["train"]))
    ref_run = rt.cmbs_supervised(ref, ref_data, 2, 3, dtype=torch.float64, seed=SEED, sampler=sampler)
    run = train_avel(ours, data, 2, batch_size=3)
    assert len(ref_run.step_losses) == 2 * 2  # the partial batch kept
    assert sorted(ref_run.evaluations) == [1, 2]
    assert_same_training(ref_run, ref, run, cmbs_ref.ours_to_reference_key, initial)


# ---------------------------------------------------------------------------------------------
# protocol facts over the scripts' full lengths


def script_evaluates(head: str, epoch0: int, epochs: int) -> bool:
    """The evaluation conditions of the scripts (0-based ``epoch0``)."""
    if head in ("a+v-att", "dmrn"):
        return epoch0 % 5 == 0  # supervised_main.py:114
    if head == "psp":
        return epoch0 % 5 == 0 and epoch0 != 0  # fully_supervised_main.py:110, :118 (save/check_epoch 5)
    return ((epoch0 + 1) % 1 == 0) or (epoch0 == epochs - 1)  # supv_main.py:127 (eval_freq 1)


@pytest.mark.parametrize("head,epochs,split,keep", [("a+v-att", 300, "val", ">"), ("dmrn", 300, "val", ">"),
                                                    ("psp", 300, "test", ">="), ("cmbs", 200, "test", ">")])
def test_protocol_evaluates_and_keeps_as_the_scripts(head, epochs, split, keep):
    protocol = get_head(head).reference_protocols["supervised"]
    assert protocol.evaluated_epochs(epochs) == [e + 1 for e in range(epochs) if script_evaluates(head, e, epochs)]
    assert protocol.select_on == split
    assert get_head(head).train_defaults["epochs"] == epochs
    rng = random.Random(0)
    scores = [rng.choice([0.5, 0.6, 0.7]) for _ in range(60)]  # many ties
    best, kept_script, kept_ours, best_ours = 0, 0, 0, float("-inf")
    for i, score in enumerate(scores, start=1):
        if (score > best) if keep == ">" else (score >= best):
            best, kept_script = score, i
        if protocol.replaces(score, best_ours):
            best_ours, kept_ours = score, i
    assert kept_ours == kept_script


def test_weak_ave_eccv18_keeps_the_last_evaluation():
    """weak_supervised_main.py:101-104 never updates best_val_acc: every evaluation above 0 is saved."""
    protocol = get_head("a+v-att").reference_protocols["weak"]
    kept = None
    for epoch, score in [(1, 0.4), (6, 0.7), (11, 0.5)]:
        if protocol.replaces(score, 0.9):
            kept = epoch
    assert kept == 11
    assert protocol.evaluated_epochs(250)[-1] == 246


@pytest.mark.parametrize("head,shuffle,drop_last", [("a+v-att", False, True), ("dmrn", False, True),
                                                    ("psp", True, True), ("cmbs", True, False)])
def test_protocol_orders_batches_as_the_scripts(head, shuffle, drop_last):
    """AVE-ECCV18: get_batch(i) takes lis[i*bs:(i+1)*bs] of one fixed order, len // bs batches; PSP:
    a new permutation, len // bs batches; CMBS: DataLoader(shuffle=True), partial batch kept."""
    protocol = get_head(head).reference_protocols["supervised"]
    assert (protocol.shuffle, protocol.drop_last) == (shuffle, drop_last)
    generator = torch.Generator().manual_seed(0)
    n, bs = 23, 5
    epochs = [epoch_order(n, bs, BatchOrder(protocol.shuffle, protocol.drop_last), generator) for _ in range(2)]
    for batches in epochs:
        flat = torch.cat(batches).tolist()
        assert [len(b) for b in batches] == [bs] * (n // bs) + ([] if drop_last else [n % bs])
        assert len(set(flat)) == len(flat)
        if not shuffle:
            assert flat == list(range(n // bs * bs))  # the order file's first len // bs * bs samples
    if shuffle:  # a new permutation every epoch
        assert torch.cat(epochs[0]).tolist() != torch.cat(epochs[1]).tolist()
    else:
        assert torch.cat(epochs[0]).tolist() == torch.cat(epochs[1]).tolist()


def test_ave_eccv18_learning_rate_decays_per_iteration():
    """supervised_main.py:67 + :107-108: StepLR(15000) stepped BEFORE each optimizer.step(): the
    decayed lr is used from the 15000th step (0-based step 14999), i.e. in batch 24 of 52 of the
    289th epoch, not after epoch 288. The reference protocol applies the decay per step; the avel
    protocol after epoch 288 (lr_step=288: 23 steps of the 289th epoch at 1e-3 instead of 1e-4)."""
    step_size, steps = 7, 30
    p_ref, p_ours = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.Adam([p_ref], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=step_size, gamma=0.1)
    ours_opt = torch.optim.Adam([p_ours], lr=1e-3)
    step_decay_per_iteration(ours_opt, step_size, 0.1)
    seen = []
    ours_opt.register_step_post_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    expected = []
    for _ in range(steps):
        p_ref.grad, p_ours.grad = torch.ones(1), torch.ones(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ours_opt.step()
    assert seen == pytest.approx(expected, rel=1e-12)
    assert expected[step_size - 2] == pytest.approx(1e-3) and expected[step_size - 1] == pytest.approx(1e-4)
    # the resolved schedules of dmrn: reference protocol per iteration, avel protocol per epoch
    reference = resolve_schedule(train_cfg(protocol="reference"), get_head("dmrn"))
    assert (reference.lr_step, reference.lr_step_unit, reference.source["lr_step"]) == (15000, "iteration", "reference protocol")
    assert make_optimizer(get_head("dmrn")(C), reference)[1] is None  # no per-epoch scheduler
    avel = resolve_schedule(train_cfg(), get_head("dmrn"))
    assert (avel.lr_step, avel.lr_step_unit) == (288, "epoch")
    assert 52 * 288 < 15000 <= 52 * 289  # 3339 // 64 = 52 steps per epoch


def test_psp_and_cmbs_learning_rates_per_epoch_are_the_scripts():
    """PSP: ``if (epoch+1) % 60 == 0 and epoch < 170: lr *= 0.8`` after each epoch (:98-99); CMBS:
    MultiStepLR([10, 20, 30], 0.5) stepped after each epoch (supv_main.py:101, :141), Adam 7e-4,
    clip 0.5 (supv_train.sh)."""
    for head, epochs in (("psp", 300), ("cmbs", 200)):
        schedule = resolve_schedule(train_cfg(protocol="reference"), get_head(head))
        optimizer, scheduler = make_optimizer(get_head(head)(C), schedule)
        ours = []
        for _ in range(epochs):
            ours.append(optimizer.param_groups[0]["lr"])
            with warnings.catch_warnings():  # no optimiser step here
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        lr, expected = schedule.lr, []
        for epoch in range(epochs):
            expected.append(lr)
            if head == "psp" and (epoch + 1) % 60 == 0 and epoch < 170:
                lr *= 0.8
            if head == "cmbs" and epoch + 1 in (10, 20, 30):
                lr *= 0.5
        assert ours == pytest.approx(expected, rel=1e-12)
    cmbs = resolve_schedule(train_cfg(protocol="reference"), get_head("cmbs"))
    assert (cmbs.lr, cmbs.batch_size, cmbs.grad_clip, cmbs.weight_decay) == (7e-4, 64, 0.5, 0.0)
    psp = resolve_schedule(train_cfg(protocol="reference"), get_head("psp"))
    assert (psp.lr, psp.batch_size, psp.grad_clip, psp.weight_decay) == (1e-3, 128, None, 0.0)


# ---------------------------------------------------------------------------------------------
# each side's own initialisation: the same distributions


def reference_and_ours(name: str, seed: int):
    """The reference model as its script builds it (transcription + :func:`rt.script_initialisation`)."""
    torch.manual_seed(seed)
    if name == "a+v-att":
        ref, key = avel_ref.RefAttNet(), avel_ref.ours_to_reference_key
    elif name == "dmrn":
        ref, key = avel_ref.RefTBMRFNet(), avel_ref.ours_to_reference_key
    elif name == "psp":
        ref, key = psp_ref.RefPspNetFully(), psp_ref.reference_key
    else:
        ref, key = cmbs_ref.RefSupvMainModel(cmbs_ref.MAIN_JSON), cmbs_ref.ours_to_reference_key
    rt.script_initialisation(name, ref)
    torch.manual_seed(1000 + seed)
    return ref.state_dict(), get_head(name)(C).state_dict(), key


@pytest.mark.parametrize("name", ["a+v-att", "dmrn", "psp", "cmbs"])
def test_initial_weights_follow_the_reference_distributions(name):
    """Every weight of the head starts from the distribution its reference counterpart starts from
    (Xavier where the reference calls it, PyTorch's defaults elsewhere): constants are equal, other
    tensors have the same spread (std within 10 % over 2 draws for >= 2000 values, max |w| within a
    factor 1.5 for 200 - 2000 values; tensors of fewer values, e.g. the bias of a one-unit layer,
    are too small to tell and are skipped: < 0.1 % of the parameters). A head with, e.g., Xavier
    where the reference keeps the default (sqrt(6 / (fan_in + fan_out)) vs 1 / sqrt(fan_in)) fails."""
    pooled: dict[str, tuple[list, list]] = {}
    for seed in (0, 1):
        ref, ours, key = reference_and_ours(name, seed)
        for k, value in ours.items():
            expected = ref[key(k)].reshape(value.shape)
            pooled.setdefault(k, ([], []))[0].append(value.double().flatten())
            pooled[k][1].append(expected.double().flatten())
    skipped, total = 0, 0
    for k, (ours_values, ref_values) in pooled.items():
        o, r = torch.cat(ours_values), torch.cat(ref_values)
        total += o.numel()
        if float(r.std()) == 0.0:
            assert torch.equal(o, r), k
        elif r.numel() >= 2000:
            assert float(o.std()) == pytest.approx(float(r.std()), rel=0.1), k
            assert abs(float(o.mean())) < 0.1 * float(r.std()) + abs(float(r.mean())) + 1e-3, k
        elif r.numel() >= 200:
            ratio = float(o.abs().max()) / float(r.abs().max())
            assert 1 / 1.5 < ratio < 1.5, (k, ratio)
        else:
            skipped += o.numel()
    assert skipped < 1e-3 * total


def test_reference_protocol_is_refused_for_heads_without_one():
    with pytest.raises(ValueError, match="no recorded reference training protocol.*heads that have one: .*a\\+v-att"):
        resolve_protocol(train_cfg(protocol="reference"), get_head("bmfn"))
    with pytest.raises(ValueError, match="weak setting"):
        resolve_protocol(train_cfg(protocol="reference", setting="weak"), get_head("dmrn"))
    assert isinstance(resolve_protocol(train_cfg(protocol="reference", setting="weak"), get_head("a+v-att")), Protocol)
