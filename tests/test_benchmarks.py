"""The benchmark scripts run end to end (shortened) and write what the README quotes from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_inference_benchmark_smoke(tmp_path):
    out = tmp_path / "inference.json"
    command = [
        sys.executable, str(BENCHMARKS / "bench_inference.py"), "--layers", "1", "--prefill-tokens", "64",
        "--context", "64", "--rounds", "1", "--decode-steps", "1", "--dtypes", "float32",
        "--modes", "mobilemoe", "mobilemoe-avx2-kernels", "mobilemoe-loop-all-experts", "qwen2moe-batched_mm",
        "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    modes = report["results"]["float32"]
    assert modes["mobilemoe-avx2-kernels"]["max_abs_diff_vs_eager"] < 1e-4
    assert "vs_avx2_kernels" in report["ratios"]["float32"]["decode"]
    assert modes["mobilemoe"]["decode"]["tok_s"] > 0 and modes["mobilemoe"]["prefill"]["tok_s"] > 0
    # Every MoE path of the package agrees with the eager reference, the baseline included.
    assert modes["mobilemoe"]["max_abs_diff_vs_eager"] < 1e-4
    assert modes["mobilemoe-loop-all-experts"]["max_abs_diff_vs_eager"] < 1e-4
    assert "vs_loop_all_experts" in report["ratios"]["float32"]["decode"]
    assert out.with_suffix(".png").stat().st_size > 0

    table = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), str(out)], capture_output=True, text=True)
    assert table.returncode == 0 and "| float32 | **mobilemoe** |" in table.stdout


@pytest.mark.slow
def test_training_benchmark_smoke(tmp_path):
    out = tmp_path / "training.json"
    command = [
        sys.executable, str(BENCHMARKS / "bench_training.py"), "--layers", "1", "--batch", "1", "--seq-len", "32",
        "--repeats", "2", "--modes", "mobilemoe", "qwen2moe-grouped_mm", "mobilemoe-pytorch-ops", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]["float32"]
    assert list(results) == ["mobilemoe", "qwen2moe-grouped_mm", "mobilemoe-pytorch-ops"]  # as asked, not by model
    assert results["mobilemoe"]["tok_s"] > 0 and results["mobilemoe-pytorch-ops"]["runs"] == 2
    assert {"vs_best_qwen2moe", "vs_pytorch_ops"} <= set(report["ratios"]["float32"])


@pytest.mark.slow
def test_export_benchmark_smoke(tmp_path):
    out = tmp_path / "export.json"
    command = [
        sys.executable, str(BENCHMARKS / "bench_export.py"), "--layers", "1", "--runtimes", "onnx", "--prefill", "16",
        "--context", "16", "--decode-steps", "2", "--repeats", "1", "--long-context", "32",
        "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    moe, dense = report["results"]["onnx"]["mobilemoe"], report["results"]["onnx"]["dense-pro"]
    assert moe["decode"]["tok_s"] > 0 and dense["prefill"]["16"]["tok_s"] > 0
    assert moe["long_context"]["context"] == 32 and moe["peak_rss_gib"] > 0
    from modeling_mobilemoe import MobileMoEConfig

    assert moe["int4_weight_bytes"] == MobileMoEConfig.from_preset("S", num_hidden_layers=1).int4_weight_bytes()
    assert "decode" in report["ratios"]["onnx"]
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, dtype, phases, modes",
    [
        (
            "bench_experts.py",
            "float32",
            ("inference", "training"),
            ("cpu_fused", "sorted_mm-pytorch-ops", "grouped_mm", "eager"),
        ),
        ("bench_attention.py", "bfloat16", ("causal", "padded"), ("prefill_attention", "sdpa", "eager")),
    ],
)
def test_layer_component_benchmark_smoke(tmp_path, script, dtype, phases, modes):
    out = tmp_path / "report.json"
    command = [
        sys.executable, str(BENCHMARKS / script), "--tokens", "48", "--repeats", "1", "--dtypes", dtype,
        "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for phase in phases:
        assert set(report["results"][dtype][phase]) == set(modes)
        assert report["ratios"][dtype][phase][f"vs_{modes[1]}"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
