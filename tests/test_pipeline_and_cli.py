"""The user-facing paths: Auto classes + pipeline on a saved folder, the `mobilemoe` CLI and its demo."""

import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM, MobileMoETokenizer
from modeling_mobilemoe.hub import validate_card
from modeling_mobilemoe.tokenizer_training import shipped_tokenizer_path


def test_pipeline_chat_on_a_saved_folder(tmp_path):
    torch.manual_seed(0)
    MobileMoEForCausalLM(MobileMoEConfig.from_preset("tiny", num_hidden_layers=2)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(shipped_tokenizer_path()).save_pretrained(tmp_path)
    assert (tmp_path / "tokenization_mobilemoe.py").exists()  # tokenizer remote code travels too

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer, MobileMoETokenizer) and isinstance(model, MobileMoEForCausalLM)

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [{"role": "user", "content": "What is two plus three?"}]
    out = generator(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert out[:-1] == messages and out[-1]["role"] == "assistant"

    # The pipeline's reply is exactly greedy decoding after the chat template's generation prompt.
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert out[-1]["content"] == tokenizer.decode(generated, skip_special_tokens=True)


def _cli(*args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "modeling_mobilemoe.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_every_stage_improves_its_heldout_metric(tmp_path):
    # 13-14 minutes on one thread beside the other tests on a 2-core AMD EPYC without AVX-512.
    result = _cli("demo", "--out", str(tmp_path / "demo"), cwd=tmp_path, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("[tokenizer]", "[pretrain]", "[midtrain]", "[sft]", "[qat]", "[plot]", "[chat]      assistant:",
                 "[eval]", "[card]", "[publish]"):  # fmt: skip
        assert line in result.stdout
    summaries = {
        stage: json.loads((tmp_path / "demo" / stage / "stage_summary.json").read_text())
        for stage in ("pretrain", "midtrain", "sft", "qat")
    }
    for stage, summary in summaries.items():
        assert summary["after"]["heldout_loss"] < summary["before"]["heldout_loss"], stage
    # INT4 weights + INT8 activations cost the SFT model little before QAT (PTQ), and QAT trains on from there.
    qat = summaries["qat"]
    assert abs(qat["before"]["heldout_loss"] - qat["before"]["float_heldout_loss"]) < 0.05
    assert qat["after"]["saved_weights_bytes"] < 1.05 * qat["after"]["int4_weight_bytes_predicted"]
    midtrain, sft = summaries["midtrain"], summaries["sft"]
    assert midtrain["after"]["long_context_gain"] > midtrain["before"]["long_context_gain"] + 0.3
    # A handful of the 152 held-out answers: measured 3 -> 6 and 6 -> 6 in two runs, so only "no worse" is asserted;
    # the held-out chat loss above is what SFT reliably moves.
    assert sft["after"]["chat_accuracy"] >= sft["before"]["chat_accuracy"]
    assert (tmp_path / "demo" / "loss_curve.png").stat().st_size > 10_000
    config = json.loads((tmp_path / "demo" / "qat" / "config.json").read_text())
    assert config["model_type"] == "mobilemoe" and "auto_map" in config
    assert config["quantization"]["format"] == "mobilemoe-int4-g32"
    # It ends with lm-eval on the shipped task, the card and a dry-run publish folder of the INT4 model.
    results = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert results["n-samples"]["mobilemoe_toy_facts"]["effective"] == 279
    hub = tmp_path / "demo" / "hub"
    assert (hub / "model.safetensors").read_bytes() == (tmp_path / "demo" / "qat" / "model.safetensors").read_bytes()
    card = validate_card(ModelCard.load(hub / "README.md"))
    assert "int4" in card.tags and card.eval_results[0].dataset_name == "mobilemoe_toy_facts"
    assert card.eval_results[0].metric_value == results["results"]["mobilemoe_toy_facts"]["acc,none"]


def test_info_reports_the_paper_counts(tmp_path):
    result = _cli("info", "--preset", "S", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "272.5M" in result.stdout and "1263.4M" in result.stdout


def test_cli_errors_name_the_problem(tmp_path):
    result = _cli("info", "--config", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2
    assert "missing" in result.stderr
