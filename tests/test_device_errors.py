"""A device torch cannot use is one line and exit 2 before any work, in every command that takes
--device (avel-predict's is in tests/test_predict_units.py): no traceback, nothing written."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def one_error_line(result, prefix: str) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), result.output
    return lines[0]


@pytest.mark.parametrize("extra", [[], ["--no-preflight"]])
def test_avel_extract_refuses_cuda_without_a_gpu(tmp_path, extra):
    from extract.cli import main

    (tmp_path / "m.csv").write_text("sample_id,video_id,path,category,onset,offset,split\n")
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(main, ["--manifest", str(tmp_path / "m.csv"), "--store", str(store), "--device", "cuda",
                                       "--weights", "random", *extra])
    line = one_error_line(result, "avel-extract: error: device 'cuda' asked for")
    assert line.endswith("use --device cpu") and not store.exists()
    result = CliRunner().invoke(main, ["--manifest", str(tmp_path / "m.csv"), "--store", str(store), "--device", "gpu"])
    one_error_line(result, "avel-extract: error: device 'gpu' is not a device name")


def test_avel_extract_bench_refuses_cuda_without_a_gpu(tmp_path):
    from extract.cli import main

    result = CliRunner().invoke(main, ["--device", "cuda:0", "bench", "--clips", str(tmp_path)])
    one_error_line(result, "avel-extract bench: error: device 'cuda:0' asked for")


def test_a_remote_cluster_is_not_refused_for_the_submitting_machine(tmp_path, monkeypatch):
    """With a remote scheduler the GPUs are the workers': the submitting machine may have none."""
    import extract.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run_command", lambda pipeline, **kw: seen.update(kw) or 0)
    (tmp_path / "m.csv").write_text("sample_id,video_id,path,category,onset,offset,split\n")
    result = CliRunner().invoke(cli.main, ["--manifest", str(tmp_path / "m.csv"), "--device", "cuda",
                                           "--scheduler", "tcp://head:8786"])
    assert result.exit_code == 0 and seen["scheduler"] == "tcp://head:8786", result.output


@pytest.mark.parametrize("command", [["bench", "--device", "cuda"], ["render-sol", "--run", "{tmp}", "--video", "x",
                                                                      "--out", "{tmp}/o", "--device", "cuda"]])
def test_avel_train_subcommands_refuse_cuda_without_a_gpu(tmp_path, command):
    from train.cli import main
    from train.predict.render import command as render_sol  # a plugin command of avel-train

    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    if command[0] == "render-sol":
        main, args = render_sol, args[1:]
    result = CliRunner().invoke(main, args + (["--workdir", str(tmp_path / "w")] if command[0] == "bench" else []))
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and "torch sees no CUDA device" in result.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
