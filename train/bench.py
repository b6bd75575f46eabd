"""Speed benchmark: this trainer vs a reference-style per-batch loop, same head, same data.

One synthetic AVE-sized store (``rows`` videos x 10 x 7x7x512 float16 + 10 x 128 audio, from
:func:`extract.factories.synthetic.make_synthetic`, made once under ``workdir``) and the same features written as the reference code's h5 files
(``visual_feature.h5`` float32, ``audio_feature.h5``, ``labels.h5`` one-hot [N, 10, 29],
``train_order.h5`` / ``test_order.h5``). Timed, on the same machine in one process:

- **this trainer**: load the store once into memory (:func:`train.data.load_task_data`), then
  :func:`train.loop.train_epoch` of the avel task (+ one validation pass per epoch, as ``fit`` does);
- **reference-style loop** (YapengTian/AVE-ECCV18 ``dataloader.AVEDataset`` + ``supervised_main``):
  read the h5 arrays, then for every batch copy its samples one by one into a float32 numpy batch,
  wrap it as tensors, move it to the device, forward/backward/step, read the loss back; every 5
  epochs read the h5 files again (``val`` builds a new dataset) and evaluate the 402 test videos
  in one batch.

Both use the same head (default ``dmrn``), Adam 1e-3, batch 64, the head's own loss. Reported:
seconds per epoch, load time, and the extrapolated full schedule (``schedule_epochs``, AVEL: 300);
and, to isolate the data path, the time to assemble one epoch's batches without any model.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .heads.base import total_loss

log = logging.getLogger(__name__)

T = 10
NUM_EVENTS = 28
SPLIT_SIZES = {"train": 3339, "val": 402, "test": 402}  # AVE
REF_EVAL_EVERY = 5


def _split_sizes(rows: int) -> dict[str, int]:
    """AVE's split proportions scaled to ``rows`` (exactly AVE's for 4143)."""
    total = sum(SPLIT_SIZES.values())
    val = max(1, round(rows * SPLIT_SIZES["val"] / total))
    test = max(1, round(rows * SPLIT_SIZES["test"] / total))
    return {"train": rows - val - test, "val": val, "test": test}


def make_synthetic(workdir: Path, rows: int, seed: int = 0) -> dict[str, Any]:
    """Create (once) the synthetic store, manifests and reference h5 files under ``workdir``.

    The store is :func:`extract.factories.synthetic.make_synthetic`'s (28 classes, AVE's split proportions);
    the h5 files hold the same numbers (visual as float32) and the manifests' labels."""
    from extract.factories.synthetic import make_synthetic as write_synthetic

    workdir.mkdir(parents=True, exist_ok=True)
    sizes = _split_sizes(rows)
    h5 = {name: workdir / f"{name}.h5" for name in ("visual_feature", "audio_feature", "labels", "train_order", "val_order", "test_order")}
    manifests = {split: workdir / "manifests" / f"{split}.csv" for split in sizes}
    store_name = f"ave-synthetic-{rows}.zarr"
    # the manifests and h5 files are shared by every size: remake everything unless the last
    # completed write was of this size and seed
    done, stamp = workdir / "ave-synthetic.done", f"rows {rows} seed {seed}\n"
    if not (done.exists() and done.read_text() == stamp):
        log.info("creating the synthetic store %s and h5 files (once)", workdir / store_name)
        done.unlink(missing_ok=True)  # an interrupted rewrite must not pass for the previous one
        written = write_synthetic(workdir, splits=sizes, store_name=store_name, classes=[f"event{k:02d}" for k in range(NUM_EVENTS)], segments=T,
                                  seed=seed, rows_per_shard=64,
                                  attrs={"fingerprint": f"synthetic-bench-{seed}", "extractor": {"name": "train.bench synthetic"},
                                         "weights": {"visual": "synthetic", "audio": "synthetic"}, "versions": {}})
        _write_h5(written.store, manifests, h5)
        done.write_text(stamp)
    return {"store": workdir / store_name, "manifests": manifests, "h5": h5, "sizes": sizes}


def _write_h5(store_path: Path, manifests: dict[str, Path], h5: dict[str, Path]) -> None:
    """The reference code's h5 files of the store's rows (store rows = manifest rows, in order)."""
    import h5py

    from extract.core.manifest import read_manifest
    from extract.core.store import open_store

    store = open_store(store_path)
    rows = len(store)
    segment_labels = np.concatenate([read_manifest(manifests[split]).segment_labels(T) for split in manifests])
    labels = np.eye(NUM_EVENTS + 1, dtype=np.float32)[segment_labels]  # one-hot [N, T, 29], background last
    with h5py.File(h5["visual_feature"], "w") as fv, h5py.File(h5["audio_feature"], "w") as fa:
        dv = fv.create_dataset("avadataset", (rows, T, 7, 7, 512), dtype="float32")
        da = fa.create_dataset("avadataset", (rows, T, 128), dtype="float32")
        for shard in range(store.num_shards):
            r = store.shard_rows(shard)
            dv[r.start : r.stop] = store.read("visual", slice(r.start, r.stop)).astype(np.float32)
            da[r.start : r.stop] = store.read("audio", slice(r.start, r.stop))
    with h5py.File(h5["labels"], "w") as f:
        f.create_dataset("avadataset", data=labels)
    start = 0
    for split in manifests:
        n = len(read_manifest(manifests[split]).samples)
        with h5py.File(h5[f"{split}_order"], "w") as f:
            f.create_dataset("order", data=np.arange(start, start + n))
        start += n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Records wall seconds (``<key>_s``) and this process's CPU seconds (``<key>_cpu_s``, all
    threads) of timed blocks; CPU seconds stay comparable when other jobs share the machine."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, repeats: int = 1):
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        _sync(self.device)
        self.times[f"{key}_s"] = (time.perf_counter() - wall) / repeats
        self.times[f"{key}_cpu_s"] = (time.process_time() - cpu) / repeats


def _build(head_name: str, device: torch.device, seed: int = 0, fused: bool = False):
    """The head and Adam 1e-3 (``fused`` on a GPU: what :func:`train.loop.make_optimizer` gives
    this trainer; the reference uses torch's default)."""
    from .registry import get_head

    torch.manual_seed(seed)
    cls = get_head(head_name)
    model = cls(num_classes=NUM_EVENTS + 1, setting="supervised").to(device)
    fused = fused and device.type == "cuda"
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if fused else {}))


def time_this_trainer(paths: dict, head_name: str, device: torch.device, epochs: int, batch_size: int) -> dict[str, float]:
    """Load once (``load``), assemble an epoch of batches (``data_epoch``), train (``epoch``),
    one validation pass (``eval``)."""
    from extract.core.settings import load_pipeline

    from .data import iterate_batches, load_task_data
    from .loop import train_epoch
    from .tasks.avel_task import AvelTask

    timed = Stopwatch(device)
    with timed("load"):
        data = load_task_data(paths["store"], {k: paths["manifests"][k] for k in ("train", "val")}, device=device)
    model, optimizer = _build(head_name, device, fused=True)
    task = AvelTask(data, load_pipeline(search=False).train)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for key in ("warm_up", "data_epoch"):  # the second pass is the one reported
        with timed(key):
            for batch in iterate_batches(data.bank, data.splits["train"], batch_size, shuffle=True, generator=gen):
                batch["visual"].sum()  # touch the batch, as a forward pass would
    with timed("epoch", epochs):
        for _ in range(epochs):
            train_epoch(model, optimizer, task, batch_size, gen, rng)
    with timed("eval"):
        task.evaluate(model, "val")
    del data
    return timed.times


def _read_reference_h5(h5: dict, order: str) -> tuple[np.ndarray, ...]:
    """What the reference's ``AVEDataset.__init__`` reads (dataloader.py): the order, then the
    whole audio, labels and visual arrays."""
    import h5py

    with h5py.File(h5[order], "r") as f:
        indices = f["order"][:]
    with h5py.File(h5["audio_feature"], "r") as f:
        audio_all = f["avadataset"][:]
    with h5py.File(h5["labels"], "r") as f:
        labels_all = f["avadataset"][:]
    with h5py.File(h5["visual_feature"], "r") as f:
        visual_all = f["avadataset"][:]
    return indices, audio_all, labels_all, visual_all


def time_reference_loop(paths: dict, head_name: str, device: torch.device, epochs: int, batch_size: int) -> dict[str, float]:
    """The reference's data path (YapengTian/AVE-ECCV18 dataloader.py ``AVEDataset`` and
    supervised_main.py ``train`` / ``val``): whole h5 arrays in numpy, each batch copied sample
    by sample into float32 numpy buffers, moved to the device, the loss read back every step; an
    evaluation (``val``, every 5 epochs) builds a new dataset of the test order, i.e. reads the
    h5 files again, and scores its 402 videos in one batch."""
    h5 = paths["h5"]
    timed = Stopwatch(device)
    with timed("load"):
        order, audio_all, labels_all, visual_all = _read_reference_h5(h5, "train_order")
    model, optimizer = _build(head_name, device)

    def batch_of(lis, b, size, vb, ab, lb, visual, audio, labels):
        for i in range(size):
            idx = lis[b * size + i]
            vb[i] = visual[idx]
            ab[i] = audio[idx]
            lb[i] = labels[idx]
        one_hot = torch.from_numpy(lb).float().to(device)
        return {"audio": torch.from_numpy(ab).float().to(device), "visual": torch.from_numpy(vb).float().to(device),
                "labels": one_hot.argmax(-1), "video_label": one_hot[:, :, :NUM_EVENTS].amax(1).argmax(-1)}

    vb = np.zeros((batch_size, T, 7, 7, 512), np.float32)
    ab = np.zeros((batch_size, T, 128), np.float32)
    lb = np.zeros((batch_size, T, NUM_EVENTS + 1), np.float32)
    arrays = (visual_all, audio_all, labels_all)
    nb_batch = len(order) // batch_size
    for key in ("warm_up", "data_epoch"):  # the second pass is the one reported
        with timed(key):
            for b in range(nb_batch):
                batch_of(order, b, batch_size, vb, ab, lb, *arrays)["visual"].sum()
    model.train()
    with timed("epoch", epochs):
        for _ in range(epochs):
            for b in range(nb_batch):
                batch = batch_of(order, b, batch_size, vb, ab, lb, *arrays)
                optimizer.zero_grad()
                loss = total_loss(model.loss(model(batch["audio"], batch["visual"]), batch))
                loss.backward()
                optimizer.step()
                float(loss.detach())
    del visual_all, arrays
    model.eval()
    with timed("eval"), torch.no_grad():
        test_order, audio_all, labels_all, visual_all = _read_reference_h5(h5, "test_order")
        n_test = len(test_order)
        tv = np.zeros((n_test, T, 7, 7, 512), np.float32)
        ta = np.zeros((n_test, T, 128), np.float32)
        tl = np.zeros((n_test, T, NUM_EVENTS + 1), np.float32)
        batch = batch_of(test_order, 0, n_test, tv, ta, tl, visual_all, audio_all, labels_all)
        model(batch["audio"], batch["visual"]).scores.cpu().numpy()
    del visual_all
    return timed.times


def _default_head() -> str:
    from .registry import head_names

    names = head_names("avel")
    if not names:
        raise RuntimeError("no avel head is registered")
    return "dmrn" if "dmrn" in names else names[0]


def run_benchmark(workdir: Path, *, head_name: str | None = None, rows: int = 4143, epochs: int = 1, batch_size: int = 64,
                  schedule_epochs: int = 300, device: str = "auto", threads: int | None = None, json_out: str | None = None) -> str:
    """Run both timings and return the report (also as JSON at ``json_out``)."""
    from .data import resolve_device

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    head_name = head_name or _default_head()
    paths = make_synthetic(Path(workdir), rows)
    ours = time_this_trainer(paths, head_name, dev, epochs, batch_size)
    ref = time_reference_loop(paths, head_name, dev, epochs, batch_size)
    for suffix in ("_s", "_cpu_s"):
        ours[f"schedule{suffix}"] = ours[f"load{suffix}"] + schedule_epochs * (ours[f"epoch{suffix}"] + ours[f"eval{suffix}"])
        ref[f"schedule{suffix}"] = (ref[f"load{suffix}"] + schedule_epochs * ref[f"epoch{suffix}"]
                                    + (schedule_epochs / REF_EVAL_EVERY) * ref[f"eval{suffix}"])
    result = {
        "head": head_name, "rows": rows, "train_samples": paths["sizes"]["train"], "batch_size": batch_size,
        "timed_epochs": epochs, "schedule_epochs": schedule_epochs, "device": str(dev), "torch_threads": torch.get_num_threads(),
        "machine": machine_description(dev), "this_trainer": ours, "reference_loop": ref,
        "epoch_speedup": ref["epoch_s"] / ours["epoch_s"], "schedule_speedup": ref["schedule_s"] / ours["schedule_s"],
        "data_speedup": ref["data_epoch_s"] / ours["data_epoch_s"],
        "epoch_speedup_cpu": ref["epoch_cpu_s"] / ours["epoch_cpu_s"],
        "schedule_speedup_cpu": ref["schedule_cpu_s"] / ours["schedule_cpu_s"],
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return format_report(result)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU)"


def format_report(r: dict[str, Any]) -> str:
    """Wall-clock and process-CPU seconds of both trainers as a small table."""
    o, f = r["this_trainer"], r["reference_loop"]
    lines = [
        f"benchmark: head {r['head']}, {r['rows']} videos ({r['train_samples']} train), batch {r['batch_size']}, "
        f"{r['device']} ({r['machine']}, torch threads {r['torch_threads']}), {r['timed_epochs']} timed epoch(s), "
        f"load average {r['load_average']}",
        f"{'':<28}{'load':>8}{'batches':>9}{'epoch':>9}{'eval':>8}{str(r['schedule_epochs']) + ' epochs':>12}",
    ]
    for name, v in (("this trainer", o), ("reference-style loop", f)):
        for kind, suffix in (("wall s", "_s"), ("cpu s", "_cpu_s")):
            cells = [v[f"{k}{suffix}"] for k in ("load", "data_epoch", "epoch", "eval")]
            lines.append(f"{name + ' ' + kind:<28}{cells[0]:>8.1f}{cells[1]:>9.2f}{cells[2]:>9.2f}{cells[3]:>8.2f}{v[f'schedule{suffix}']:>12.0f}")
    lines.append(f"speed-up (wall): {r['epoch_speedup']:.2f}x per epoch, {r['schedule_speedup']:.2f}x for the full schedule; "
                 f"(cpu): {r['epoch_speedup_cpu']:.2f}x, {r['schedule_speedup_cpu']:.2f}x; "
                 f"batch assembly alone ('batches', no model): {r['data_speedup']:.2f}x")
    return "\n".join(lines)
