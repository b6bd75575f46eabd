"""The checks that need a CUDA device (marker ``gpu``; skipped without one). ``avel-train
gpucheck`` runs the same functions (train/gpucheck.py) and records their figures."""
from __future__ import annotations

import pytest
import torch

from train.predict.gpucheck import (BF16_TOLERANCE, _shared_media, check_batch_independence, check_precision_deviation,
                            check_resident_matches_cpu)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_vgg19_rows_do_not_depend_on_their_batch_under_cudnn():
    result = check_batch_independence("cuda")
    assert result["precision"] in ("bf16", "fp16")  # extract.precision: auto on a GPU
    assert result["ok"], result


def test_bf16_is_close_to_fp32_on_real_clips(media_dir):
    result = check_precision_deviation(_shared_media(), "cuda")
    assert len(result["relative_l2"]) >= 3, result
    assert result["ok"], result  # every clip 0 < relative L2 < BF16_TOLERANCE
    assert result["max"] < BF16_TOLERANCE


def test_resident_training_matches_the_cpu_within_seed_noise(tmp_path):
    result = check_resident_matches_cpu(tmp_path, "cuda", rows=300, epochs=6, seeds=(0, 1, 2))
    assert result["ok"], result
