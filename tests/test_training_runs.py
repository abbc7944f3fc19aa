"""Training runs end to end on the tiny recipes: resume after `kill -9`, stage hand-offs, and `accelerate launch` with
two processes (DDP and FSDP2 on CPU, gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from modeling_mobilemoe import MobileMoEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes", "tiny")
QUICK = ["per_device_train_batch_size=4", "per_device_eval_batch_size=4", "logging_steps=1", "heldout_metric=false"]

pytestmark = pytest.mark.slow


def train_command(stage: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modeling_mobilemoe.training",
        os.path.join(RECIPES, stage, "config.yaml"),
        *overrides,
    ]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def logged_losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as file:
        history = json.load(file)["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_a_run_killed_mid_way_resumes_on_the_same_loss_trajectory(tmp_path):
    arguments = [*QUICK, "max_steps=10", "save_steps=2", "save_total_limit=2", "seed=3"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run(train_command("pretrain", *arguments, f"output_dir={reference_dir}"))

    process = subprocess.Popen(
        train_command("pretrain", *arguments, f"output_dir={killed_dir}"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint-4"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "stage_summary.json").exists()  # it really died mid-way

    resumed = run(train_command("pretrain", *arguments, f"output_dir={killed_dir}", "resume_from_checkpoint=auto"))
    summary = json.loads((killed_dir / "stage_summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == 10, resumed.stdout[-2000:]

    reference, continued = logged_losses(reference_dir), logged_losses(killed_dir)
    resumed_step = int(summary["resumed_from"].rsplit("-", 1)[1])
    assert resumed_step >= 4
    assert set(range(resumed_step + 1, 11)) <= set(continued)
    for step in range(resumed_step + 1, 11):
        assert continued[step] == pytest.approx(reference[step], abs=1e-4), (step, reference, continued)


def test_stages_hand_off_pretrain_midtrain_sft_qat_and_lora(tmp_path):
    pretrain, midtrain, sft = tmp_path / "pretrain", tmp_path / "midtrain", tmp_path / "sft"
    run(train_command("pretrain", *QUICK, "max_steps=2", f"output_dir={pretrain}"))
    run(train_command("midtrain", *QUICK, "max_steps=2", f"model_name_or_path={pretrain}", f"output_dir={midtrain}"))
    run(train_command("sft", *QUICK, "max_steps=2", f"model_name_or_path={midtrain}", f"output_dir={sft}"))

    lora = tmp_path / "sft-lora"
    peft_config = (
        "peft_config={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj],"
        " target_parameters: [feed_forward.routed_experts.gate_up_proj, feed_forward.routed_experts.down_proj]}"
    )
    run(
        train_command(
            "sft", *QUICK, "max_steps=2", f"model_name_or_path={midtrain}", f"output_dir={lora}", peft_config
        )
    )
    adapter = load_file(lora / "adapter_model.safetensors")
    assert any("routed_experts" in name for name in adapter) and any("q_proj" in name for name in adapter)
    assert not (lora / "model.safetensors").exists()  # only the adapters are trained and saved

    qat = tmp_path / "qat"
    run(train_command("qat", *QUICK, "max_steps=2", f"model_name_or_path={sft}", f"output_dir={qat}"))
    packed = load_file(qat / "model.safetensors")
    assert packed["model.embed_tokens.qweight"].dtype == torch.uint8
    assert json.loads((qat / "config.json").read_text())["quantization"]["format"] == "mobilemoe-int4-g32"

    # The QAT-gap benchmark: QAT and a float fine-tune from the same checkpoint, and the PTQ of both.
    gap = tmp_path / "qat_gap.json"
    run([sys.executable, os.path.join(REPO, "benchmarks", "qat_gap.py"), "--model", str(sft), "--out",
         str(tmp_path / "gap"), "--json", str(gap), *QUICK[:2], "max_steps=2"])  # fmt: skip
    report = json.loads(gap.read_text())
    losses = report["heldout_loss"]
    assert report["steps"] == 2 and all(0 < loss < 20 for loss in losses.values())
    assert losses["float_checkpoint"] != losses["float_fine_tuned"]  # the float run trained
    assert report["ptq_gap"] == losses["ptq_int4_of_fine_tuned"] - losses["float_fine_tuned"]
    assert abs(report["saved_weights_bytes"] / report["int4_weight_bytes_predicted"] - 1) < 0.05

    contexts = [
        MobileMoEConfig.from_pretrained(folder).max_position_embeddings for folder in (pretrain, midtrain, sft)
    ]
    assert contexts[0] < contexts[1] == contexts[2]  # mid-training extends the context, SFT keeps it
    for folder in (pretrain, midtrain, sft):
        summary = json.loads((folder / "stage_summary.json").read_text())
        assert summary["steps"] == 2
        assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
        assert (folder / "router_load.json").exists()


@pytest.mark.parametrize("accelerate_config", ["ddp", "fsdp2"])
def test_accelerate_launch_two_processes(tmp_path, accelerate_config):
    output_dir = tmp_path / accelerate_config
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(REPO, "recipes", "accelerate_configs", f"{accelerate_config}.yaml"),
        "--num_processes", "2", "--mixed_precision", "no",
        "-m", "modeling_mobilemoe.training", os.path.join(RECIPES, "pretrain", "config.yaml"),
        *QUICK, "max_steps=3", "use_cpu=true", f"output_dir={output_dir}",
    ]  # fmt: skip
    result = run(command)
    summary = json.loads((output_dir / "stage_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3, result.stdout[-2000:]
    assert (output_dir / "model.safetensors").exists()
