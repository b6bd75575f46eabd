"""One contract test over EVERY registered head of EVERY task (timm-style), so heads added later are
covered automatically. Each head is built as a tiny variant through its own Config (:func:`tiny_config`:
small widths, the task's input interface unchanged) and run on a small learnable batch of its task's
interface (:data:`TASK_BATCHES`):

* outputs have the task's shapes and are finite; ``loss`` is a finite scalar;
* ``loss`` reaches every parameter with a finite, non-zero gradient;
* the same seed builds the same model (same outputs), another seed other weights;
* a few Adam steps lower the loss;
* ``Config`` rejects unknown options, at the top and in nested sections;
* every Config field is used: changing it changes the parameter count or the output (same seed,
  same input, train mode) in some setting, or it is a training-only option (:data:`TRAINING_ONLY`)
  and then changes the loss instead; :data:`APPLIED_BY_TASK` lists the one option the task applies.
"""
from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from extract.core.settings import ConfigError
from train.heads.base import split_loss, total_loss
from train.registry import TASKS, discover, get_head, head_names

from heads_testutils import n_params

torch.set_num_threads(1)  # tiny tensors: one thread is fastest (no spin-waiting on a busy machine)

B, T, C = 3, 4, 5
STEPS = 4

#: the widths of a tiny variant, by Config field name (wherever a head has such a field)
TINY = {
    "hidden": 8, "att_dim": 8, "fusion_dim": 8, "classifier_hidden": 8,  # avel.py, avdln, dcca, stm
    "fc12_hidden": 8, "fc4_hidden": 8, "lstm_hidden": 8, "match_hidden": 8,  # co-attention, avltc
    "agva_hidden": 8, "tsga_hidden": 8, "segments": T,  # avltc (TSGA maps each segment to T weights)
    "d": 8, "heads": 2, "ffn_dim": 16, "mfb_pool": 1, "mfb_dim": 512,  # bmfn (mfb_dim = mfb_pool x 512)
    "embed": 4, "components": 4,  # cml embedders
    "dim": 8, "visual_channels": 16, "audio_channels": 8,  # stm
    "decoder_ffn_dim": 16, "key_dim": 8, "att_hidden": 8,  # cmran, cmbs, cace
}

#: options that only enter the training objective (or its post-training fit): changing one must
#: change the loss, not the model
TRAINING_ONLY = {
    "loss": "avel.py heads: which classification loss",
    "weak_pool": "MIL pooling of the weak loss (coattention, bmfn)",
    "lambda_supervised": "co-attention stream weight of the supervised loss",
    "lambda_weak": "co-attention stream weight of the weak loss",
    "lambda_c": "coattention-cml stream weight of the contrastive loss",
    "margin": "contrastive-loss margin (cml heads)",
    "reg": "dcca: ridge of the CCA objective and of the linear CCA fitted after training",
    "lambda_avps": "psp, cpsp: weight of the AVPS loss",
    "weak_target": "psp: target of the weak BCE (segment proportions or one-hot video label)",
    "lambda_scon": "cpsp: weight of the segment-level contrastive loss",
    "lambda_vcon": "cpsp: weight of the video-level contrastive loss",
    "scon_temperature": "cpsp: temperature of the segment-level contrastive loss",
    "scon_form": "cpsp: published (constant) or per-anchor segment-level contrastive loss",
    "margin_supervised": "cpsp: video-level contrastive margin, supervised",
    "margin_weak": "cpsp: video-level contrastive margin, weak",
    "negatives_supervised": "cpsp: nearest negatives of the video-level contrastive loss, supervised",
    "negatives_weak": "cpsp: nearest negatives of the video-level contrastive loss, weak",
    "contrastive_weight": "cace: weight of the contrastive loss (--contras_coeff)",
}
#: options the task applies around the head (tested with the task)
APPLIED_BY_TASK = {"init_from": "coattention-cml: the cml task loads the checkpoint (tests/test_cml_task.py)"}

#: alternative values where the generic rule (see :func:`alternatives`) does not apply
ALTERNATIVE = {
    "activation": "tanh", "match_activation": "tanh", "esa_activation": "relu",
    "threshold_supervised": 0.3, "threshold_weak": 0.3, "correlation_dim": 6,  # theta entries ~ 1/T
    "embed": 8,  # dcca needs components <= embed
    "visual_dim": {"visual_dim": 256, "mfb_dim": 256},  # bmfn also needs mfb_dim = mfb_pool x visual_dim
    "mfb_pool": {"mfb_pool": 2, "mfb_dim": 1024},  # coupled: mfb_dim = mfb_pool x visual_dim
    "mfb_dim": {"mfb_pool": 2, "mfb_dim": 1024},
    "scon_temperature": {"scon_temperature": 0.3, "scon_form": "anchor"},  # cpsp's published form ignores t
    "margin_supervised": 2.0,  # unit-vector distances <= 2: the hinge is active for every video
    "negatives_supervised": {"negatives_supervised": 1, "margin_supervised": 2.0},
    "negatives_weak": {"negatives_weak": 1, "margin_weak": 2.0},
}
LR = 3e-4


# ------------------------------------------------------------------------------------------
# the tasks' head interfaces


def event_batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Each video has one event class on a contiguous span, background (C - 1) elsewhere."""
    labels = torch.full((B, T), C - 1, dtype=torch.long)
    video_label = torch.randint(0, C - 1, (B,), generator=g)
    for b in range(B):
        start = int(torch.randint(0, T - 1, (1,), generator=g))
        labels[b, start:start + 2] = video_label[b]
    return {"labels": labels, "video_label": video_label, "valid": torch.ones(B, T, dtype=torch.bool)}


def avel_batch(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """avel (train/heads/base.py): audio [B, T, 128], visual [B, T, 7, 7, 512]; labels, video_label,
    valid. Every segment's audio and visual map carry its class's prototype plus noise."""
    g = torch.Generator().manual_seed(seed)
    batch = event_batch(g)
    proto_a, proto_v = torch.randn(C, 128, generator=g), torch.rand(C, 512, generator=g) * 2.0
    batch["audio"] = proto_a[batch["labels"]] + 0.3 * torch.randn(B, T, 128, generator=g)
    batch["visual"] = proto_v[batch["labels"]][:, :, None, None, :] * (1 + 0.3 * torch.rand(B, T, 7, 7, 512, generator=g))
    return batch


def cml_batch(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """cml (train/heads/cml_heads.py): audio [B, T, 128], visual [B, T, 7, 7, 512]; match [B, T]
    (1 in the event), valid [B, T]; every video has matched and unmatched segments."""
    batch = avel_batch(cfg, seed)
    batch["match"] = (batch["labels"] < C - 1).float()
    batch["valid"][-1, -1] = False
    return batch


def sol_batch(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """sol (train/heads/stm.py, train/tasks/sol_task.py): audio [B, T, 6, 4, Ca], visual
    [B, T, 8, 8, Cv] (channels from the head's Config); labels [B, T]."""
    g = torch.Generator().manual_seed(seed)
    batch = event_batch(g)
    ca, cv = cfg.audio_channels, cfg.visual_channels
    proto_a, proto_v = torch.randn(C, ca, generator=g), torch.rand(C, cv, generator=g) * 2.0
    batch["audio"] = proto_a[batch["labels"]][:, :, None, None] + 0.3 * torch.randn(B, T, 6, 4, ca, generator=g)
    batch["visual"] = torch.rand(B, T, 8, 8, cv, generator=g)
    batch["visual"][:, :, 2:4, 3:5] += proto_v[batch["labels"]][:, :, None, None]
    return batch


TASK_BATCHES = {"avel": avel_batch, "cml": cml_batch, "sol": sol_batch}


def outputs(task: str, out) -> list[torch.Tensor]:
    """The tensors a head of ``task`` returns (for comparisons)."""
    return [out.audio, out.visual] if task == "cml" else [out.scores]


#: heads whose output must carry a spatial map (``HeadOutput.spatial`` / ``CmlOutput.spatial``)
SPATIAL_MAP_HEADS = {"a+v-att", "v-att", "dmrn", "dmrfe", "cmran", "psp", "cpsp", "cmbs", "cace", "bmfn", "avltc",
                     "coattention", "coattention-cml", "stm"}
#: heads without one (no spatial attention: global average pooling, or no visual map at all)
NO_SPATIAL_MAP_HEADS = {"a", "v", "a+v", "avdln", "dcca"}


def check_spatial(name: str, out, visual: torch.Tensor) -> None:
    """``out.spatial``: None, or [B, T, H, W] on the visual input's H x W grid, each map a
    distribution over the H*W positions (every registered head's map is a softmax over them)."""
    if name in NO_SPATIAL_MAP_HEADS:
        assert out.spatial is None
    if name in SPATIAL_MAP_HEADS:
        assert out.spatial is not None, f"{name}: no spatial map"
    if out.spatial is not None:
        assert out.spatial.shape == (B, T, *visual.shape[2:4])
        assert (out.spatial >= 0).all()
        torch.testing.assert_close(out.spatial.sum((-2, -1)), torch.ones(B, T))


def check_outputs(task: str, head, out) -> None:
    if task == "cml":
        S = len(head.stream_weights())
        assert out.audio.dim() == 4 and out.audio.shape[:3] == (B, S, T) and out.visual.shape == out.audio.shape
        dist = head.distance_matrix(out)
        assert dist.shape == (B, T, T) and torch.isfinite(dist).all()
    else:
        assert out.scores.shape == (B, T, C)
        pred = head.predict(out)
        assert pred.shape == (B, T) and pred.dtype == torch.long
    assert all(torch.isfinite(x).all() for x in outputs(task, out))


# ------------------------------------------------------------------------------------------
# tiny variants


def nested_fields(config, prefix: str = ""):
    """(dotted name, field, value) of every leaf field of a Config, nested sections included."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from nested_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def as_overrides(dotted: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}} (the form of ``heads.<name>`` in pipeline.yaml)."""
    out: dict = {}
    for key, value in dotted.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def tiny_overrides(cls) -> dict:
    return {name: TINY[f.name] for name, f, _ in nested_fields(cls.Config()) if f.name in TINY}


def tiny_config(cls, extra: dict | None = None):
    return cls.make_config(as_overrides({**tiny_overrides(cls), **(extra or {})}))


def build(name: str, setting: str, seed: int = 0, extra: dict | None = None):
    cls = get_head(name)
    torch.manual_seed(seed)
    return cls(C, setting, tiny_config(cls, extra))


def head_setting_cases():
    return [pytest.param(name, setting, id=f"{name}-{setting}")
            for name in head_names() for setting in get_head(name).settings]


def forward(head, batch, train: bool = False):
    head.train(train)
    with torch.set_grad_enabled(train):
        return head(batch["audio"], batch["visual"])


# ------------------------------------------------------------------------------------------
# the contract


def test_every_task_has_a_batch_and_every_head_a_registered_task():
    discover()
    assert set(TASK_BATCHES) == set(TASKS)
    assert {get_head(name).task for name in head_names()} <= set(TASKS)
    assert {"avel", "cml", "sol"} <= {get_head(name).task for name in head_names()}


@pytest.mark.parametrize("name,setting", head_setting_cases())
def test_head_contract(name, setting):
    cls = get_head(name)
    task = cls.task
    head = build(name, setting)
    batch = TASK_BATCHES[task](head.config)

    # the objective of the last epoch of the head's schedule (every loss term that switches on is on)
    epochs = int((getattr(cls, f"{setting}_train_defaults", None) or cls.train_defaults).get("epochs") or 1)
    head.start_epoch(epochs, epochs)
    out = forward(head, batch)
    check_outputs(task, head, out)
    check_spatial(name, out, batch["visual"])
    with torch.no_grad():
        loss_before, terms = split_loss(head.loss(out, batch))
    assert loss_before.dim() == 0 and torch.isfinite(loss_before)
    for term_name, term in terms.items():  # named parts of the objective: finite scalars
        assert term.dim() == 0 and torch.isfinite(term), term_name

    # same seed -> same weights -> same outputs; another seed -> other weights
    twin = build(name, setting)
    for x, y in zip(outputs(task, forward(twin, batch)), outputs(task, out)):
        assert torch.equal(x, y)
    other = build(name, setting, seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(head.parameters(), other.parameters()))
    del twin, other

    # every parameter gets a finite, non-zero gradient from loss; a few Adam steps lower the loss
    optimizer = torch.optim.Adam(head.parameters(), lr=LR)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = total_loss(head.loss(forward(head, batch, train=True), batch))
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        if step == 0:
            check_gradients(head)
        optimizer.step()
    with torch.no_grad():
        loss_after = float(total_loss(head.loss(forward(head, batch), batch)))
    assert loss_after < float(loss_before), f"loss did not decrease: {float(loss_before):.6f} -> {loss_after:.6f}"


def check_gradients(head) -> None:
    params = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    zero = [n for n, p in params if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradient for {zero}"


@pytest.mark.parametrize("name", head_names())
def test_config_rejects_unknown_options(name):
    cls = get_head(name)
    with pytest.raises(ConfigError, match="unknown key"):
        cls.make_config({"no_such_option": 1})
    for section in (f.name for f in dataclasses.fields(cls.Config) if dataclasses.is_dataclass(getattr(cls.Config(), f.name))):
        with pytest.raises(ConfigError, match="unknown key"):
            cls.make_config({section: {"no_such_option": 1}})


def alternatives(name: str, value, config_cls) -> dict:
    """Overrides that change the dotted field ``name`` (currently ``value``) to another valid value."""
    leaf = name.rsplit(".", 1)[-1]
    prefix = name[: len(name) - len(leaf)]
    if leaf in ALTERNATIVE:
        alt = ALTERNATIVE[leaf]
        if not isinstance(alt, dict):
            return {name: alt}
        known = {n for n, _, _ in nested_fields(config_cls())}  # couplings apply where the field exists
        return {prefix + k: v for k, v in alt.items() if prefix + k in known}
    hint = typing.get_type_hints(config_cls)
    for part in prefix.strip(".").split(".") if prefix else ():
        hint = typing.get_type_hints(hint[part])
    tp = hint[leaf]
    if typing.get_origin(tp) is typing.Literal:
        return {name: next(c for c in typing.get_args(tp) if c != value)}
    if isinstance(value, bool):
        return {name: not value}
    if isinstance(value, int):
        return {name: value // 2 if value > 1 else value + 1}
    if isinstance(value, float):
        return {name: value / 2 if value else 0.1}
    raise AssertionError(f"no alternative value for {name} = {value!r}: add one to ALTERNATIVE")


def changes(name: str, overrides: dict) -> tuple[bool, bool]:
    """(model changed, loss changed) when ``overrides`` are applied to the tiny variant of head
    ``name``, over its settings: parameter count, or train-mode output / loss (same seeds, same batch)."""
    cls = get_head(name)
    model_changed = loss_changed = False
    for setting in cls.settings:
        base, alt = build(name, setting), build(name, setting, extra=overrides)
        if n_params(base) != n_params(alt):
            return True, True
        batch = TASK_BATCHES[cls.task](base.config)
        results = []
        for head in (base, alt):
            torch.manual_seed(123)  # same dropout masks
            out = forward(head, batch, train=True)
            results.append((outputs(cls.task, out), total_loss(head.loss(out, batch)).detach()))
        (out_a, loss_a), (out_b, loss_b) = results
        model_changed |= any(not torch.equal(x, y) for x, y in zip(out_a, out_b))
        loss_changed |= not torch.equal(loss_a, loss_b)
    return model_changed, loss_changed


def field_cases():
    return [pytest.param(name, field, id=f"{name}-{field}")
            for name in head_names() for field, _, _ in nested_fields(get_head(name).Config())]


@pytest.mark.parametrize("name,field", field_cases())
def test_every_config_field_is_used(name, field):
    """No silently ignored option: each field changes the model, or (training-only options) the loss."""
    cls = get_head(name)
    leaf = field.rsplit(".", 1)[-1]
    if leaf in APPLIED_BY_TASK:
        pytest.skip(APPLIED_BY_TASK[leaf])
    value = dict((n, v) for n, _, v in nested_fields(tiny_config(cls)))[field]
    model_changed, loss_changed = changes(name, alternatives(field, value, cls.Config))
    if leaf in TRAINING_ONLY:
        assert not model_changed, f"{name}: {field} is listed as training-only but changes the model"
        assert loss_changed, f"{name}: {field} ({TRAINING_ONLY[leaf]}) does not change the loss"
    else:
        assert model_changed, f"{name}: option {field} changes neither the parameters nor the output"


@pytest.mark.parametrize("name", [n for n in head_names(task="avel") if "weak" in get_head(n).settings])
def test_recorded_weak_pooling_is_the_one_the_loss_applies(name):
    """metrics.json records ``head.weak_pooling(train.weak_pool)``: when a head reports the same
    pooling for both requests its weak loss must not depend on the request, otherwise it must."""
    head = build(name, "weak")
    batch = TASK_BATCHES["avel"](head.config)
    out = forward(head, batch)
    with torch.no_grad():
        by_request = {pool: float(total_loss(head.loss(out, batch, pool))) for pool in ("mean", "max")}
    reported = {pool: head.weak_pooling(pool) for pool in ("mean", "max")}
    assert set(reported.values()) <= {"mean", "max"}
    if reported["mean"] == reported["max"]:
        assert by_request["mean"] == by_request["max"], (reported, by_request)
    else:
        assert reported == {"mean": "mean", "max": "max"}
        assert by_request["mean"] != by_request["max"], by_request  # an ignored request gives equal bits


# ------------------------------------------------------------------------------------------
# HeadOutput.spatial: the map the head computes


def test_stm_spatial_is_eq1_computed_by_hand():
    """STM without memory: ``spatial`` = eq. 1 on the projected maps, alpha(i, j) = softmax_ij(
    x_v(i, j) . phi(x_a)), phi = max over the audio map's positions, both L2-normalised over
    channels; computed here position by position in numpy from the head's own projections."""
    import numpy as np

    head = build("stm", "supervised", extra={"memory": "none"}).eval()
    batch = TASK_BATCHES["sol"](head.config)
    with torch.no_grad():
        out = head(batch["audio"], batch["visual"])
        x_a = head._project(batch["audio"], head.audio_proj).double().numpy()  # B, T, D, 6, 4
        x_v = head._project(batch["visual"], head.visual_proj).double().numpy()  # B, T, D, 8, 8
    expected = np.zeros((B, T, 8, 8))
    for b in range(B):
        for t in range(T):
            a = x_a[b, t].reshape(x_a.shape[2], -1).max(axis=1)
            a = a / max(np.linalg.norm(a), 1e-12)
            logits = np.zeros((8, 8))
            for i in range(8):
                for j in range(8):
                    v = x_v[b, t, :, i, j]
                    logits[i, j] = float(a @ (v / max(np.linalg.norm(v), 1e-12)))
            e = np.exp(logits - logits.max())
            expected[b, t] = e / e.sum()
    np.testing.assert_allclose(out.spatial.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_coattention_cml_spatial_is_its_cspa_map_on_the_grid():
    """coattention-cml: ``spatial`` = the CSPA block's Z^v_att [B, T, 49] laid out row-major on
    the 7 x 7 grid (position 7 i + j -> (i, j)), a distribution over the positions."""
    head = build("coattention-cml", "supervised").eval()
    batch = TASK_BATCHES["cml"](head.config)
    with torch.no_grad():
        out = head(batch["audio"], batch["visual"])
        flat = head.cspa(batch["audio"], batch["visual"].flatten(2, 3))["spatial"]
    assert out.spatial.shape == (B, T, 7, 7)
    for i, j in ((0, 0), (0, 6), (3, 2), (6, 0), (6, 6)):
        assert torch.equal(out.spatial[:, :, i, j], flat[:, :, 7 * i + j])
    torch.testing.assert_close(out.spatial.sum((-2, -1)), torch.ones(B, T))
