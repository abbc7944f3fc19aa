"""Training building blocks: recipes and overrides, document-respecting packing, aux-loss-free balancing."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainingArguments

from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM, MobileMoEQATConfig
from modeling_mobilemoe.tokenizer_training import shipped_tokenizer_path
from modeling_mobilemoe.training import pack_documents, parse_recipe, router_health, update_expert_bias
from modeling_mobilemoe.training.balancing import moe_blocks
from modeling_mobilemoe.training.data import IGNORE_INDEX, load_mixture
from modeling_mobilemoe.training.runner import last_complete_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PRETRAIN = os.path.join(REPO, "recipes", "tiny", "pretrain", "config.yaml")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shipped_tokenizer_path())


# ---------------------------------------------------------------------------------------------------------------------
# Recipes


def test_recipe_parses_into_the_stage_dataclasses():
    recipe = parse_recipe(TINY_PRETRAIN)
    assert recipe.stage.stage == "pretrain"
    assert recipe.model.preset == "tiny"
    assert type(recipe.training) is TrainingArguments
    assert recipe.training.learning_rate == pytest.approx(3e-3)
    assert recipe.data.max_seq_length == 256


def test_overrides_reach_scalars_and_nested_mappings():
    recipe = parse_recipe(
        TINY_PRETRAIN,
        ["max_steps=7", "learning_rate=1e-3", "model_config_overrides.max_position_embeddings=512", "bf16=false"],
    )
    assert recipe.training.max_steps == 7
    assert isinstance(recipe.training.learning_rate, float) and recipe.training.learning_rate == 1e-3
    assert recipe.model.model_config_overrides["max_position_embeddings"] == 512
    assert recipe.model.model_config_overrides["expert_bias_update_rate"] == 1e-3  # siblings kept


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["no_such_key=1"], "no_such_key"),
        (["stage=finetune"], "stage"),
        (["max_steps"], "key=value"),
        (["learning_rate=fast"], "learning_rate"),
        (["model_name_or_path=somewhere"], "model_name_or_path / preset"),
        (["dtype=float16"], "dtype"),
        (["datasets=[]"], "datasets"),
        (["eval_fraction=1.5"], "eval_fraction"),
        (["trainer=deepspeed"], "trainer"),
        (["quantization_config={weight_bits: 4}"], "quantization_config: QAT starts from a trained checkpoint"),
    ],
)
def test_bad_recipe_values_fail_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(TINY_PRETRAIN, overrides)


@pytest.mark.parametrize(
    "path",
    sorted(glob.glob(os.path.join(REPO, "recipes", "*", "*", "config*.yaml"))),
    ids=lambda path: os.path.relpath(path, os.path.join(REPO, "recipes")),
)
def test_every_shipped_recipe_parses(path):
    overrides = ["bf16=false"]  # the GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only host
    recipe = parse_recipe(path, overrides)
    assert recipe.stage.stage == os.path.basename(os.path.dirname(path))
    if recipe.model.model_name_or_path is None:
        assert recipe.model.preset is not None
    if recipe.stage.stage == "qat":
        quantization = MobileMoEQATConfig(**recipe.model.quantization_config)
        assert (quantization.weight_bits, quantization.group_size, quantization.activation_bits) == (4, 32, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Data


def test_mixture_draws_from_every_source_by_weight(tmp_path):
    for name, count in (("a", 400), ("b", 400)):
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} document {i}\n" for i in range(count)))
    mixture = load_mixture(
        [{"path": str(tmp_path / "a.txt"), "weight": 3}, {"path": str(tmp_path / "b.txt"), "weight": 1}], ["text"]
    )
    first = [row["text"][0] for row in mixture.select(range(400))]
    assert 0.65 < first.count("a") / len(first) < 0.85


def test_streamed_sources_pack_like_loaded_ones(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text(
        "".join(f'{{"text": "first source, document {i}.", "n": {i}}}\n' for i in range(50))
    )
    (tmp_path / "b.txt").write_text("".join(f"second source, line {i}.\n" for i in range(50)))
    first = [{"path": str(tmp_path / "a.jsonl")}]  # its extra column `n` is dropped
    streamed = list(pack_documents(load_mixture(first, ["text"], streaming=True), tokenizer, 32).take(5))
    loaded = pack_documents(load_mixture(first, ["text"]), tokenizer, 32)
    assert [block["input_ids"] for block in streamed] == loaded[:5]["input_ids"]
    assert set(streamed[0]) == {"input_ids", "position_ids", "labels"}

    both = first + [{"path": str(tmp_path / "b.txt")}]
    blocks = pack_documents(load_mixture(both, ["text"], streaming=True), tokenizer, 32).take(20)
    text = tokenizer.decode([token for block in blocks for token in block["input_ids"]])
    assert "first source" in text and "second source" in text


def test_unknown_source_keys_and_formats_fail_clearly(tmp_path):
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="format"):
        load_mixture([{"path": str(tmp_path / "data.xml")}], ["text"])
    with pytest.raises(ValueError, match="textfield"):
        load_mixture([{"path": "bundled:corpus", "textfield": "body"}], ["text"])
    with pytest.raises(ValueError, match="bundled dataset 'nope'"):
        load_mixture([{"path": "bundled:nope"}], ["text"])
    with pytest.raises(ValueError, match="no column"):
        load_mixture([{"path": "bundled:sft"}], ["text"])


def test_packing_restarts_positions_per_document_and_masks_their_first_label(tokenizer):
    documents = ["one two three", "a much longer second document that spills over", "short"]
    blocks = pack_documents(Dataset.from_dict({"text": documents}), tokenizer, max_seq_length=8)
    assert all(len(ids) == 8 for ids in blocks["input_ids"])
    stream = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    expected = [t for ids in stream for t in [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]]
    assert [t for block in blocks["input_ids"] for t in block] == expected[: len(blocks) * 8]
    for ids, positions, labels in zip(blocks["input_ids"], blocks["position_ids"], blocks["labels"]):
        assert positions[0] == 0  # a continued document restarts at the block start
        for i in range(1, 8):
            if ids[i] == tokenizer.bos_token_id:
                assert positions[i] == 0 and labels[i] == IGNORE_INDEX
            else:
                assert positions[i] == positions[i - 1] + 1 and labels[i] == ids[i]


def test_packed_documents_do_not_attend_to_each_other(tokenizer):
    """Logits of a document inside a packed block equal those of the document alone."""
    torch.manual_seed(0)
    model = MobileMoEForCausalLM(MobileMoEConfig.from_preset("tiny")).eval()
    documents = ["The cat sat on the mat.", "Seven plus two is nine.", "Mia walked to the market on Monday."]
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 2 for d in documents]
    block = pack_documents(Dataset.from_dict({"text": documents}), tokenizer, max_seq_length=sum(lengths))[0]
    with torch.no_grad():
        packed = model(  # no KV cache: as in training, where the runner turns `use_cache` off
            input_ids=torch.tensor([block["input_ids"]]),
            position_ids=torch.tensor([block["position_ids"]]),
            use_cache=False,
        ).logits[0]
        start = 0
        for length in lengths:
            alone = model(input_ids=torch.tensor([block["input_ids"][start : start + length]])).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-5)
            start += length


# ---------------------------------------------------------------------------------------------------------------------
# Aux-loss-free balancing


def test_router_health_summarises_loads():
    loads = torch.tensor([[10.0, 10.0, 10.0, 10.0], [30.0, 10.0, 0.0, 0.0]])
    health = router_health(loads)
    assert health["router/dead_experts"] == 2
    assert health["router/max_min_load_ratio"] == float("inf")
    assert health["router/load_cv"] == pytest.approx(
        (0 + (torch.tensor([30.0, 10, 0, 0]).std(unbiased=False) / 10).item()) / 2
    )
    assert router_health(loads[:1])["router/max_min_load_ratio"] == 1.0


def test_expert_bias_update_moves_a_skewed_router_towards_balance():
    torch.manual_seed(0)
    model = MobileMoEForCausalLM(MobileMoEConfig.from_preset("tiny", num_hidden_layers=1)).train()
    block = moe_blocks(model)[0]
    with torch.no_grad():  # a random router plus a strong preference for the first experts
        block.router.weight.normal_(0, 0.1)
        block.router.weight[:, 0] = torch.linspace(3, -3, block.router.weight.shape[0])
    hidden = torch.randn(1, 512, model.config.hidden_size)
    hidden[..., 0] = hidden[..., 0].abs() + 1.0

    def loads_after_forward() -> torch.Tensor:
        with torch.no_grad():
            block(hidden)
        return update_expert_bias([block], rate=0.02)[0]

    initial = router_health(loads_after_forward()[None])
    loads = [loads_after_forward() for _ in range(300)]
    final = router_health(torch.stack(loads[-20:]).sum(0)[None])  # the sign rule oscillates: average a window
    assert initial["router/dead_experts"] > 0
    assert final["router/dead_experts"] == 0
    assert final["router/load_cv"] < initial["router/load_cv"] / 3
    assert block.expert_bias[0] < 0 < block.expert_bias[-1]  # over-loaded experts pushed down, idle ones up
    assert block.expert_load.sum() == 0  # counts consumed by the update


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6: killed while saving
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
