"""A folder saved by this package loads with `trust_remote_code=True` where the package cannot be imported,
as a Hub user without it would load it."""

import json
import textwrap

import torch

from isolation import run_without_package
from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM


LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    input_ids = torch.load(folder + "/input_ids.pt")
    with torch.no_grad():
        torch.save(model(input_ids).logits, folder + "/remote_logits.pt")
        torch.save(model.generate(input_ids, max_new_tokens=5, do_sample=False), folder + "/remote_generated.pt")
    print(type(config).__name__, type(model).__name__)
    """
)


def test_saved_folder_loads_as_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    config = MobileMoEConfig.from_preset("tiny", num_hidden_layers=2)
    model = MobileMoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["auto_map"] == {
        "AutoConfig": "configuration_mobilemoe.MobileMoEConfig",
        "AutoModelForCausalLM": "modeling_mobilemoe.MobileMoEForCausalLM",
    }
    input_ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, tmp_path / "input_ids.pt")

    result = run_without_package(LOAD_WITHOUT_PACKAGE, str(tmp_path), cwd=tmp_path)
    assert result.stdout.split() == ["MobileMoEConfig", "MobileMoEForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "remote_logits.pt"), model(input_ids).logits)
        expected = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(torch.load(tmp_path / "remote_generated.pt"), expected)
