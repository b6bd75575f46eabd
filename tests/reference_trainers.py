"""Transcriptions of the reference TRAINING scripts (their loops; the models are transcribed in
tests/test_avel_parity.py, tests/test_psp_parity.py and tests/test_cmbs_parity.py and imported here).

Used by tests/test_training_parity.py (same start, same order: avel's loop must give the same curve)
and by tests/training_parity_measure.py (each side with its own initialisation and order, on an
AVE-sized synthetic store; the table of docs/training.md).

Each trainer follows its script line by line (cited as ``file:line`` of the repository's HEAD):
its data loading and batch order, how it applies the loss, its optimiser and scheduler steps, its
train / eval mode switches, its evaluation cadence and the rule that keeps a model. What the
scripts hard-code for their GPU and data (``.cuda()``, 402 samples per evaluation batch, T = 10) is
read from the data instead. Deviations a test needs are arguments whose default is the script:

- ``dtype``: the scripts feed float32 tensors (AVE-ECCV18, PSP) or float64 (CMBS); the equality
  tests run float64 on both sides;
- ``order``: where each epoch's permutation comes from (PSP: ``random.shuffle``; CMBS: the torch
  ``DataLoader``'s sampler); the equality tests inject avel's permutation;
- ``seed``: the scripts seed once at import, before the model is built; here the global torch
  generator (dropout) is seeded right before training, after the weights were copied, as avel's
  :func:`train.loop.fit` does;
- PSP's ``clear_avps_buffer``: the script's AVPS target buffer is never cleared between batches
  (a bug, see :class:`PSPFullyDataset`); ``True`` clears it, which is what avel computes; and
  ``avps_dtype``: the buffer is float32 (its 1/n rounded); float64 keeps them exact.
"""
from __future__ import annotations

import dataclasses
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from extract.core.manifest import read_manifest
from extract.core.store import open_store

#: the scripts' class count (28 events + background 28)
C = 29


# ---------------------------------------------------------------------------------------------
# the h5 files the scripts read, built from a store + manifests


@dataclasses.dataclass
class ReferenceData:
    """What the reference scripts load from their h5 files, for every store row:
    ``visual`` [R, T, 7, 7, 512] (``visual_feature.h5``; kept in the store's float16, cast per batch:
    the values a float32 h5 of these features holds), ``audio`` [R, T, 128] float32
    (``audio_feature.h5``), ``labels`` [R, T, C] one-hot float32 (``labels.h5``; background = C-1),
    ``orders`` {split: store rows in manifest order} (``train_order.h5``, ``val_order.h5``,
    ``test_order.h5``: the AVE manifests list the split files in their order)."""

    visual: np.ndarray
    audio: np.ndarray
    labels: np.ndarray
    orders: dict[str, np.ndarray]


def reference_data(store_path: str | Path, manifests: Mapping[str, str | Path]) -> ReferenceData:
    """The reference's arrays for a store and its split manifests (``{split: path}``)."""
    store = open_store(store_path)
    T = store.segments
    visual = np.asarray(store.read("visual"))
    audio = np.asarray(store.read("audio"), dtype=np.float32)
    labels = np.zeros((visual.shape[0], T, C), np.float32)
    orders = {}
    for split, path in manifests.items():
        manifest = read_manifest(path)
        rows = np.asarray([store.row_of(s.key) for s in manifest.samples], np.int64)
        seg = manifest.segment_labels(T)
        if len(manifest.classes) + 1 != C:
            raise ValueError(f"{path}: the reference scripts hard-code {C - 1} event classes, this manifest has {len(manifest.classes)}")
        labels[rows] = np.eye(C, dtype=np.float32)[seg]
        orders[split] = rows
    return ReferenceData(visual, audio, labels, orders)


@dataclasses.dataclass
class ReferenceRun:
    """What a transcribed script did: ``step_losses`` (the loss of every optimiser step),
    ``lrs`` (the lr each step used), ``evaluations`` {1-based epoch: score of the split the script
    selects on, in [0, 1]}, ``best_epoch`` (1-based epoch of the kept model), ``test_accuracy`` of the
    kept model ([0, 1], as the script's test()), ``kept_state`` (its weights), ``extra`` (other
    figures the script computes, e.g. PSP's val accuracies)."""

    step_losses: list[float] = dataclasses.field(default_factory=list)
    lrs: list[float] = dataclasses.field(default_factory=list)
    evaluations: dict[int, float] = dataclasses.field(default_factory=dict)
    best_epoch: int = 0
    test_accuracy: float | None = None
    kept_state: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _evaluate_with(model: nn.Module, state: Mapping[str, torch.Tensor], evaluate: Callable[[nn.Module], float]) -> float:
    """``evaluate(model)`` with the weights ``state`` (what ``torch.load`` of the saved model gives);
    the model's own weights are put back afterwards."""
    own = _state(model)
    model.load_state_dict(state)
    try:
        return evaluate(model)
    finally:
        model.load_state_dict(own)


#: a callback of the measurement: ``(epoch, model)`` after each of the script's evaluations
OnEvaluate = Callable[[int, nn.Module], None]


# ---------------------------------------------------------------------------------------------
# the models' own initialisation


def script_initialisation(head: str, model: nn.Module) -> nn.Module:
    """Apply the initialisation the reference models do in ``__init__`` beyond PyTorch's module
    defaults, which the forward-parity transcriptions leave out (they are loaded with copied
    weights): att_Net ``init_weights`` (models.py:33-42: Xavier-uniform weights of ``affine_v``,
    ``affine_g``, ``affine_h``, ``L1``, ``L2``, ``affine_audio``, ``affine_video``); TBMRF_Net
    ``init_weights`` (models_fusion.py:68-70: ``L2`` only); psp_net (fully_model.py:235-241:
    ``L1`` - ``L4``; ``Classify`` :180-181, AVGA and PSP are transcribed with theirs); CMBS calls
    none (PyTorch's defaults, ``nn.MultiheadAttention``'s own). The defaults of today's PyTorch are
    the distributions of the scripts' PyTorch 0.3 / 1.x (Linear: U(+-1/sqrt(fan_in)), LSTM:
    U(+-1/sqrt(hidden)))."""
    xavier = nn.init.xavier_uniform_
    if head in ("a+v-att", "concat-late"):
        for layer in (model.affine_v, model.affine_g, model.affine_h, model.L1, model.L2, model.affine_audio,
                      model.affine_video):
            xavier(layer.weight)
    elif head == "dmrn":
        xavier(model.L2.weight)
    elif head == "psp":
        for layer in (model.L1, model.L2, model.L3, model.L4, model.v_classify.L1, model.v_classify.L2,
                      model.a_classify.L1, model.a_classify.L2):
            xavier(layer.weight)
    elif head != "cmbs":
        raise ValueError(f"no reference model initialisation recorded for {head!r}")
    return model


# ---------------------------------------------------------------------------------------------
# YapengTian/AVE-ECCV18: dataloader.py AVEDataset + supervised_main.py


class AVEDataset:
    """dataloader.py:6-41. ``get_batch(idx)`` fills preallocated float32 buffers with samples
    ``lis[idx * batch_size + i]`` (one fixed order for every epoch: the order file's)."""

    def __init__(self, data: ReferenceData, order: np.ndarray, batch_size: int):
        self.data = data
        self.batch_size = batch_size
        self.lis = order  # :13-15 hf['order'][:]
        T = data.audio.shape[1]
        self.video_batch = np.float32(np.zeros([batch_size, T, 7, 7, 512]))  # :24
        self.audio_batch = np.float32(np.zeros([batch_size, T, 128]))  # :25
        self.label_batch = np.float32(np.zeros([batch_size, T, C]))  # :26

    def __len__(self) -> int:  # :28-29
        return len(self.lis)

    def get_batch(self, idx: int):  # :31-41
        for i in range(self.batch_size):
            id = idx * self.batch_size + i  # noqa: A001 - the script's name
            self.video_batch[i] = self.data.visual[self.lis[id]]
            self.audio_batch[i] = self.data.audio[self.lis[id]]
            self.label_batch[i] = self.data.labels[self.lis[id]]
        return (torch.from_numpy(self.audio_batch).float(), torch.from_numpy(self.video_batch).float(),
                torch.from_numpy(self.label_batch).float())


def ave_compute_acc(labels: np.ndarray, x_labels: np.ndarray, nb_batch: int) -> float:
    """supervised_main.py:69-83: argmax per segment of the outputs and of the one-hot labels."""
    T = x_labels.shape[1]
    pre_labels = np.zeros(nb_batch * T)
    real_labels = np.zeros(nb_batch * T)
    c = 0
    for i in range(nb_batch):
        for j in range(x_labels.shape[1]):
            pre_labels[c] = np.argmax(x_labels[i, j, :])
            real_labels[c] = np.argmax(labels[i, j, :])
            c += 1
    return float(np.mean(real_labels == pre_labels))  # sklearn accuracy_score


def ave_eccv18_supervised(model: nn.Module, data: ReferenceData, epochs: int, batch_size: int = 64, *,
                          dtype: torch.dtype = torch.float32, seed: int | None = None,
                          on_evaluate: OnEvaluate | None = None) -> ReferenceRun:
    """supervised_main.py ``train()``, ``val()``, ``test()`` (HEAD 4660337) for ``att_Net`` or
    ``TBMRF_Net`` (models ending in softmax)."""
    run = ReferenceRun()
    if seed is not None:
        torch.manual_seed(seed)
    loss_function = nn.MultiLabelSoftMarginLoss()  # :65 (PyTorch 0.3: sigmoid + BCE, mean over all entries; same value)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # :66
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=15000, gamma=0.1)  # :67

    @torch.no_grad()  # the script keeps the graph (no torch.no_grad): same numbers, more memory
    def evaluate(order: np.ndarray, net: nn.Module) -> float:  # val() :120-134, test() :137-152
        net.eval()  # :121 (never switched back to train mode: the models have no dropout / batch norm)
        ds = AVEDataset(data, order, len(order))  # :122-123 batch_size=402 = the whole split
        nb_batch = len(ds)  # :124
        audio, video, labels = ds.get_batch(0)  # :125
        x_labels = net(audio.to(dtype), video.to(dtype))  # :129
        return ave_compute_acc(labels.numpy(), x_labels.detach().cpu().numpy(), nb_batch)  # :130-132

    AVEData = AVEDataset(data, data.orders["train"], batch_size)  # :87-88
    nb_batch = len(AVEData) // batch_size  # :89 (the last partial batch is never used)
    best_val_acc = 0  # :91
    for epoch in range(epochs):  # :92
        for i in range(nb_batch):  # :96
            audio_inputs, video_inputs, labels = AVEData.get_batch(i)  # :97
            audio_inputs, video_inputs, labels = audio_inputs.to(dtype), video_inputs.to(dtype), labels.to(dtype)
            model.zero_grad()  # :102
            scores = model(audio_inputs, video_inputs)  # :103
            loss = loss_function(scores, labels)  # :104
            run.step_losses.append(float(loss.detach()))  # :105 loss.cpu().data.numpy()
            loss.backward()  # :106
            with warnings.catch_warnings():  # today's PyTorch warns about this order; the script's 0.3 did not
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()  # :107 BEFORE optimizer.step(): step k uses 1e-3 * 0.1 ** ((k + 1) // 15000)
            run.lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()  # :108
        if epoch % 5 == 0:  # :114 (0-based epochs 0, 5, 10, ...)
            val_acc = evaluate(data.orders["val"], model)  # :115 (val_order.h5, HEAD; 18eaa10 read test_order.h5)
            run.evaluations[epoch + 1] = val_acc
            if on_evaluate is not None:
                on_evaluate(epoch + 1, model)
            if val_acc > best_val_acc:  # :116
                best_val_acc = val_acc  # :117
                run.best_epoch, run.kept_state = epoch + 1, _state(model)  # :118 torch.save(net_model, ...)
    if run.kept_state is not None:  # test(): the saved model, test_order.h5 (:137-152)
        run.test_accuracy = _evaluate_with(model, run.kept_state, lambda net: evaluate(data.orders["test"], net))
    return run


# ---------------------------------------------------------------------------------------------
# jasongief/PSP_CVPR_2021: dataloader.py AVE_Fully_Dataset + fully_supervised_main.py + measure.py


class PSPFullyDataset:
    """dataloader.py:20-95 (``AVE_Fully_Dataset``). ``get_batch(idx, shuffle_samples)`` shuffles its
    sample list in place first when asked (``random.shuffle``, :76-78: the training loop asks at the
    first batch of every epoch), takes ``list_copy[idx * bs : (idx + 1) * bs]`` and fills
    preallocated float32 buffers; ``get_segment_wise_relation`` (:52-69) writes the segment labels
    and the AVPS target into buffers that persist across batches. The target row of a video is
    ``1/n`` on its n segments of its lowest class index present and is NEVER cleared: entries set by
    earlier batches (event segments of another video in the same batch row) stay. ``clear_avps_buffer``
    zeroes it per batch (avel's target). The buffer is float32 (its 1/n entries are rounded; avel's
    target is exact in the model's dtype): ``avps_dtype`` float64 keeps them exact. ``shuffle``:
    replaces ``random.shuffle`` (in place)."""

    def __init__(self, data: ReferenceData, order: np.ndarray, batch_size: int, *,
                 shuffle: Callable[[list], None] = random.shuffle, clear_avps_buffer: bool = False,
                 avps_dtype=np.float32):
        self.data = data
        self.batch_size = batch_size
        self.lis = order.tolist()  # :42
        self.list_copy = self.lis.copy().copy()  # :43
        self.shuffle = shuffle
        self.clear_avps_buffer = clear_avps_buffer
        T = data.audio.shape[1]
        self.video_batch = np.float32(np.zeros([batch_size, T, 7, 7, 512]))  # :45
        self.audio_batch = np.float32(np.zeros([batch_size, T, 128]))  # :46
        self.label_batch = np.float32(np.zeros([batch_size, T, C]))  # :48
        self.segment_label_batch = np.float32(np.zeros([batch_size, T]))  # :49
        self.segment_avps_gt_batch = np.zeros([batch_size, T], dtype=avps_dtype)  # :50 np.float32(np.zeros(...))

    def get_segment_wise_relation(self, batch_labels: np.ndarray) -> None:  # :52-69
        bs, seg_num, category_num = batch_labels.shape
        if self.clear_avps_buffer:
            self.segment_avps_gt_batch[:] = 0
        for i in range(bs):
            col_sum = np.sum(batch_labels[i].T, axis=1)
            category_bg_cols = col_sum.nonzero()[0].tolist()
            category_bg_cols.sort()
            category_col_idx = category_bg_cols[0]
            category_col = batch_labels[i, :, category_col_idx]
            same_category_row_idx = category_col.nonzero()[0].tolist()
            if len(same_category_row_idx) != 0:
                self.segment_avps_gt_batch[i, same_category_row_idx] = 1 / (len(same_category_row_idx))
        for i in range(bs):
            row_idx, col_idx = np.where(batch_labels[i] == 1)
            self.segment_label_batch[i, row_idx] = col_idx

    def __len__(self) -> int:  # :72-73
        return len(self.lis)

    def get_batch(self, idx: int, shuffle_samples: bool = False):  # :76-95
        if shuffle_samples:
            self.shuffle(self.list_copy)
        select_ids = self.list_copy[idx * self.batch_size: (idx + 1) * self.batch_size]
        for i in range(self.batch_size):
            id = select_ids[i]  # noqa: A001
            self.video_batch[i] = self.data.visual[id]
            self.audio_batch[i] = self.data.audio[id]
            self.label_batch[i] = self.data.labels[id]
        self.get_segment_wise_relation(self.label_batch)
        return (torch.from_numpy(self.audio_batch).float(), torch.from_numpy(self.video_batch).float(),
                torch.from_numpy(self.label_batch).float(), torch.from_numpy(self.segment_label_batch).long(),
                torch.from_numpy(self.segment_avps_gt_batch).to(torch.float32 if self.segment_avps_gt_batch.dtype == np.float32
                                                                else torch.float64))  # :95 .float()


def psp_avps_loss(av_simm: torch.Tensor, soft_label: torch.Tensor) -> torch.Tensor:
    """measure.py:32-41 AVPSLoss."""
    relu_av_simm = F.relu(av_simm)
    sum_av_simm = torch.sum(relu_av_simm, dim=-1, keepdim=True)
    avg_av_simm = relu_av_simm / (sum_av_simm + 1e-8)
    return nn.MSELoss()(avg_av_simm, soft_label)


def psp_fully_supervised(model: nn.Module, data: ReferenceData, epochs: int, batch_size: int = 128, *,
                         dtype: torch.dtype = torch.float32, seed: int | None = None,
                         shuffle: Callable[[list], None] = random.shuffle, clear_avps_buffer: bool = False,
                         avps_dtype=np.float32, threshold: float = 0.099, lambda_avps: float = 100.0,
                         on_evaluate: OnEvaluate | None = None, on_batch: Callable[[dict], None] | None = None) -> ReferenceRun:
    """fully_supervised_main.py ``train()``, ``val()``, ``test()`` for ``psp_net(128, 512, 128, 29)``
    (forward ``(audio, video, thr)`` -> ``(fusion, out_prob, cross_att)``). ``run.evaluations`` are
    the TEST accuracies the script selects on; ``run.extra["val"]`` its val accuracies.
    ``on_batch`` sees each training batch's targets (``segment_label``, ``avps_gt``)."""
    run = ReferenceRun(extra={"val": {}})
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # :190 (ScheduledOptim wrapper :191, Optim.py)

    @torch.no_grad()  # the script keeps the graph (no torch.no_grad): same numbers, more memory
    def evaluate(order: np.ndarray, net: nn.Module) -> float:  # val() :130-148, test() :152-175
        net.eval()  # :131 / :158
        ds = PSPFullyDataset(data, order, len(order))  # batch_size=402: the whole split
        audio, video, labels, _, _ = ds.get_batch(0)  # :135
        _, out_prob, _ = net(audio.to(dtype), video.to(dtype), threshold)  # :141
        return ave_compute_acc(labels.numpy(), out_prob.detach().cpu().numpy(), len(ds))  # measure.py:8-28

    AVEData = PSPFullyDataset(data, data.orders["train"], batch_size, shuffle=shuffle,
                              clear_avps_buffer=clear_avps_buffer, avps_dtype=avps_dtype)  # :54-55
    nb_batch = len(AVEData) // batch_size  # :56 (the last partial batch of each permutation is not used)
    best_test_acc = 0  # :60
    best_val_acc = 0  # :59
    for epoch in range(epochs):  # :62
        model.train()  # :63
        shuffle_samples = True  # :70
        for i in range(nb_batch):  # :71
            audio, video, labels, segment_label, avps_gt = AVEData.get_batch(i, shuffle_samples)  # :72
            shuffle_samples = False  # :73
            if on_batch is not None:
                on_batch({"segment_label": segment_label.clone(), "avps_gt": avps_gt.clone(), "labels": labels.clone()})
            audio, video, avps_gt = audio.to(dtype), video.to(dtype), avps_gt.to(dtype)
            model.zero_grad()  # :81
            fusion, out_prob, cross_att = model(audio, video, threshold)  # :82
            loss_cls = nn.CrossEntropyLoss()(out_prob.permute(0, 2, 1), segment_label)  # :85
            loss_avps = psp_avps_loss(cross_att, avps_gt)  # :86
            loss = loss_cls + lambda_avps * loss_avps  # :87
            run.step_losses.append(float(loss.detach()))  # :88
            run.lrs.append(optimizer.param_groups[0]["lr"])
            loss.backward()  # :92
            optimizer.step()  # :93 step_lr() = the inner optimizer's step (Optim.py:11-13)
        if (epoch + 1) % 60 == 0 and epoch < 170:  # :98-99 update_lr(): lr * 0.8 (Optim.py:19-25)
            for param_group in optimizer.param_groups:
                param_group["lr"] = param_group["lr"] * 0.8
        if epoch % 5 == 0 and epoch != 0:  # :110 save_epoch = 5
            val_acc = evaluate(data.orders["val"], model)  # :111
            run.extra["val"][epoch + 1] = val_acc
            if val_acc >= best_val_acc:  # :113 (printed only)
                best_val_acc = val_acc
        if epoch % 5 == 0 and epoch != 0:  # :118 check_epoch = 5
            test_acc = evaluate(data.orders["test"], model)  # :119
            run.evaluations[epoch + 1] = test_acc
            if on_evaluate is not None:
                on_evaluate(epoch + 1, model)
            if test_acc >= best_test_acc:  # :121 (ties: the later epoch)
                best_test_acc = test_acc  # :122
                run.best_epoch, run.kept_state = epoch + 1, _state(model)  # :123-125 torch.save
    run.test_accuracy = best_test_acc if run.kept_state is not None else None  # :127 '[best test accuracy]'
    return run


# ---------------------------------------------------------------------------------------------
# marmot-xy/CMBS: dataset/AVE_dataset.py + supv_main.py


class CMBSDataset(torch.utils.data.Dataset):
    """dataset/AVE_dataset.py:6-36: sample ``index`` of the split's order file -> (visual, audio,
    one-hot labels), as the h5 files store them (the script's features are float64, its comment at
    supv_main.py:152-154)."""

    def __init__(self, data: ReferenceData, order: np.ndarray, dtype=np.float64):
        self.data, self.order, self.dtype = data, order, dtype

    def __getitem__(self, index):
        sample_index = self.order[index]  # :24
        return (self.data.visual[sample_index].astype(self.dtype), self.data.audio[sample_index].astype(self.dtype),
                self.data.labels[sample_index].astype(self.dtype))

    def __len__(self) -> int:
        return len(self.order)


def cmbs_compute_accuracy_supervised(is_event_scores, event_scores, labels) -> torch.Tensor:
    """supv_main.py:286-302 (accuracy in %); the prediction rule is test_cmbs_parity's transcription."""
    from test_cmbs_parity import ref_predictions

    _, targets = labels.max(-1)
    correct = ref_predictions(is_event_scores, event_scores).eq(targets)
    return correct.sum().double() * (100. / correct.numel())


def cmbs_loss(outputs, labels):
    """supv_main.py:167-183 (the loss lines of train_epoch)."""
    criterion = nn.BCEWithLogitsLoss()  # :102
    criterion_event = nn.CrossEntropyLoss()  # :103
    is_event_scores, event_scores, audio_visual_gate, av_score = outputs
    is_event_scores = is_event_scores.transpose(1, 0).squeeze().contiguous()  # :169
    audio_visual_gate = audio_visual_gate.transpose(1, 0).squeeze().contiguous()  # :170
    labels_foreground = labels[:, :, :-1]  # :172
    labels_BCE, labels_evn = labels_foreground.max(-1)  # :173
    labels_event, _ = labels_evn.max(-1)  # :176
    loss_is_event = criterion(is_event_scores, labels_BCE)  # :177
    label_is_gate = criterion(audio_visual_gate, labels_BCE)  # :178
    loss_cas = criterion_event(av_score, labels_event)  # :179
    loss_event_class = criterion_event(event_scores, labels_event)  # :180
    return loss_is_event + label_is_gate + loss_event_class + loss_cas, is_event_scores  # :183


def cmbs_supervised(model: nn.Module, data: ReferenceData, epochs: int, batch_size: int = 64, *,
                    lr: float = 7e-4, clip_gradient: float = 0.5, test_batch_size: int = 16,
                    dtype: torch.dtype = torch.float64, seed: int | None = None,
                    sampler: torch.utils.data.Sampler | None = None,
                    on_evaluate: OnEvaluate | None = None) -> ReferenceRun:
    """supv_main.py ``main()``, ``train_epoch()``, ``validate_epoch()`` with supv_train.sh's flags
    (``--lr 0.0007 --clip_gradient 0.5 --n_epoch 200 --b 64 --test_batch_size 16``) and
    configs/default_config.yaml's ``eval_freq: 1``, for ``supv_main_model`` (forward
    ``(visual, audio)``). ``sampler`` replaces ``shuffle=True``'s RandomSampler (whose permutation
    comes from torch's global generator)."""
    run = ReferenceRun()
    if seed is not None:
        torch.manual_seed(seed)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    loader_options = {"generator": torch.Generator()} if sampler is not None else {}  # no draw from the global generator
    train_dataloader = torch.utils.data.DataLoader(  # :79-85 (num_workers=8 does not change the order)
        CMBSDataset(data, data.orders["train"], np_dtype), batch_size=batch_size,
        shuffle=sampler is None, sampler=sampler, num_workers=0, **loader_options)
    test_dataloader = torch.utils.data.DataLoader(  # :87-93
        CMBSDataset(data, data.orders["test"], np_dtype), batch_size=test_batch_size, shuffle=False, num_workers=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)  # :98-99
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20, 30], gamma=0.5)  # :101
    best_accuracy = 0  # :54

    @torch.no_grad()
    def validate_epoch(net: nn.Module) -> float:  # :224-283
        net.eval()  # :232
        net.to(dtype)  # :233 model.double()
        correct, count = 0.0, 0
        for visual_feature, audio_feature, labels in test_dataloader:  # :235
            is_event_scores, event_scores, _, _ = net(visual_feature, audio_feature)  # :245
            is_event_scores = is_event_scores.transpose(1, 0).squeeze()  # :246
            acc = cmbs_compute_accuracy_supervised(is_event_scores, event_scores, labels)  # :257
            correct += acc.item() * visual_feature.size(0) * 10  # :258 AverageMeter.update(acc, bs * 10)
            count += visual_feature.size(0) * 10
        return correct / count / 100.0

    for epoch in range(epochs):  # :124
        model.train()  # :151
        model.to(dtype)  # :155 model.double()
        optimizer.zero_grad()  # :156
        for visual_feature, audio_feature, labels in train_dataloader:  # :158
            outputs = model(visual_feature, audio_feature)  # :167
            loss, _ = cmbs_loss(outputs, labels)  # :169-183
            run.step_losses.append(float(loss.detach()))
            run.lrs.append(optimizer.param_groups[0]["lr"])
            loss.backward()  # :185
            if clip_gradient is not None:  # :192-193
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_gradient)
            optimizer.step()  # :198
            optimizer.zero_grad()  # :199
        if ((epoch + 1) % 1 == 0) or (epoch == epochs - 1):  # :127 eval_freq = 1
            acc = validate_epoch(model)  # :128 (the TEST loader)
            run.evaluations[epoch + 1] = acc
            if on_evaluate is not None:
                on_evaluate(epoch + 1, model)
            if acc > best_accuracy:  # :129
                best_accuracy = acc  # :130
                run.best_epoch, run.kept_state = epoch + 1, _state(model)  # :131-137 save_checkpoint
        scheduler.step()  # :141
    run.test_accuracy = best_accuracy if run.kept_state is not None else None
    return run


# ---------------------------------------------------------------------------------------------
# orders injected by the equality tests


def permutations_from(generator_seed: int, n: int) -> Callable[[], torch.Tensor]:
    """Each call: the next ``torch.randperm(n)`` of a generator seeded with ``generator_seed``, the
    permutations avel's loop draws for a shuffled epoch (:func:`train.loop.seed_everything` seeds
    that generator with the run's seed; :func:`train.data.epoch_order` draws one per epoch)."""
    generator = torch.Generator().manual_seed(generator_seed)
    return lambda: torch.randperm(n, generator=generator)


def list_shuffle_from(next_permutation: Callable[[], torch.Tensor], original: Sequence[int]) -> Callable[[list], None]:
    """A ``random.shuffle`` stand-in for :class:`PSPFullyDataset`: sets the list to the next
    permutation of ``original``."""
    original = list(original)

    def shuffle(items: list) -> None:
        items[:] = [original[int(i)] for i in next_permutation()]

    return shuffle


class EpochPermutations(torch.utils.data.Sampler):
    """A sampler giving the next permutation of ``next_permutation`` every epoch (for
    :func:`cmbs_supervised`)."""

    def __init__(self, n: int, next_permutation: Callable[[], torch.Tensor]):
        self.n, self.next_permutation = n, next_permutation

    def __iter__(self):
        return iter(self.next_permutation().tolist())

    def __len__(self) -> int:
        return self.n
