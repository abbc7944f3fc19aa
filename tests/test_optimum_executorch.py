"""MobileMoE through optimum-executorch's own API and CLI (installed with `pip install --no-deps optimum-executorch
optimum`; CI runs this file in its own step after that install, with MOBILEMOE_REQUIRE_OPTIMUM=1 so it can't skip)."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from test_export import MAX_SEQ_LEN, NEW_TOKENS, _prompt

import modeling_mobilemoe  # noqa: F401  (registers the Auto classes before optimum loads models)
from modeling_mobilemoe.export import greedy_with_pytorch


if os.environ.get("MOBILEMOE_REQUIRE_OPTIMUM") == "1":
    from optimum.executorch import ExecuTorchModelForCausalLM
else:
    ExecuTorchModelForCausalLM = pytest.importorskip("optimum.executorch").ExecuTorchModelForCausalLM

pytestmark = pytest.mark.slow
from test_export import float_folder  # noqa: E402,F401  (the fixture)


def _check_against_pytorch(model, folder) -> None:
    """Greedy tokens as transformers' `generate` (until the export's runner stops at an EOS), prefill logits within
    fp32 tolerance."""
    reference_model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = _prompt(reference_model.config.vocab_size)
    expected = greedy_with_pytorch(reference_model, prompt, NEW_TOKENS)
    tokens = model.generate(prompt[0].tolist(), max_seq_len=prompt.shape[1] + NEW_TOKENS)[prompt.shape[1]:]
    assert len(tokens) >= 8 and tokens == expected.sequences[0, prompt.shape[1]:][: len(tokens)].tolist()
    with torch.no_grad():
        logits = model.forward(prompt, torch.arange(prompt.shape[1]))
    torch.testing.assert_close(logits[0, -1], expected.logits[0, 0], atol=1e-4, rtol=1e-4)


def test_optimum_api_exports_and_runs_mobilemoe(float_folder):
    model = ExecuTorchModelForCausalLM.from_pretrained(
        str(float_folder), recipe="xnnpack", task="text-generation", max_seq_len=MAX_SEQ_LEN
    )
    _check_against_pytorch(model, float_folder)


def test_optimum_cli_exports_mobilemoe(float_folder, tmp_path):
    command = [sys.executable, "-m", "modeling_mobilemoe.export.optimum_cli", "export", "executorch",
               "--model", str(float_folder), "--task", "text-generation", "--recipe", "xnnpack",
               "--max_seq_len", str(MAX_SEQ_LEN), "--output_dir", str(tmp_path)]  # fmt: skip
    subprocess.run(command, check=True, timeout=600)
    assert (tmp_path / "model.pte").is_file()
    _check_against_pytorch(ExecuTorchModelForCausalLM.from_pretrained(str(tmp_path)), float_folder)
