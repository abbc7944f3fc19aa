"""MobileMoE modeling: forward/backward, caches, attention and experts back-ends, FP32 routing, router statistics."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache

from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM, MobileMoEModel, kernels


def small_config(**overrides) -> MobileMoEConfig:
    fields = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 16,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return MobileMoEConfig(**{**fields, **overrides})


def make_model(seed: int = 0, **overrides) -> MobileMoEForCausalLM:
    torch.manual_seed(seed)
    model = MobileMoEForCausalLM(small_config(**overrides)).eval()
    # A random non-zero selection bias makes it take part in every test.
    for block in model.moe_blocks():
        block.expert_bias.uniform_(-0.05, 0.05)
    return model


def tokens(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_backward_reaches_every_trainable_weight():
    model = make_model().train()
    input_ids = tokens(batch=4, length=16)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert not any("expert_bias" in name for name, _ in model.named_parameters())


def test_expert_bias_is_a_persistent_non_trainable_buffer():
    model = make_model()
    block = model.moe_blocks()[0]
    assert "model.layers.0.feed_forward.expert_bias" in model.state_dict()
    assert "model.layers.0.feed_forward.expert_load" not in model.state_dict()
    assert not block.expert_bias.requires_grad


def test_expert_bias_changes_selection_not_weights():
    model = make_model()
    block = model.moe_blocks()[0]
    hidden = torch.randn(32, 64)
    logits, weights, index = block.router(hidden, torch.zeros(8))
    # Strongly favour expert 7: it is selected for every token, yet its weight still comes from the raw scores.
    _, biased_weights, biased_index = block.router(hidden, torch.tensor([0.0] * 7 + [10.0]))
    assert (biased_index == 7).any(dim=-1).all()
    scores = logits.sigmoid()
    expected = scores.gather(-1, biased_index)
    expected = expected / expected.sum(-1, keepdim=True) * model.config.routed_scaling_factor
    torch.testing.assert_close(biased_weights, expected)
    assert not torch.equal(index, biased_index)


def test_incremental_decoding_matches_full_forward():
    model = make_model()
    input_ids = tokens(batch=2, length=12)
    with torch.no_grad():
        full = model(input_ids).logits
        prefix = model(input_ids[:, :7], use_cache=True)
        cache, steps = prefix.cache, [prefix.logits]
        for position in range(7, 12):
            out = model(input_ids[:, position : position + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_static_cache_generation_matches_dynamic():
    model = make_model()
    input_ids = tokens(batch=1, length=6)
    dynamic = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    static = model.generate(input_ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        out = model(input_ids, cache=cache, use_cache=True)
    torch.testing.assert_close(out.logits, model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_left_padding_matches_unpadded():
    model = make_model()
    short, long = tokens(batch=1, length=4, seed=3), tokens(batch=1, length=7, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 3:], alone[0])


def test_sdpa_matches_eager():
    model = make_model()
    input_ids = tokens(batch=2, length=12)
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[mask.bool()], eager[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["sorted_mm", "tiled_mm", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_implementations_agree_with_eager(implementation, dtype):
    model = make_model().to(dtype)
    input_ids = tokens(batch=3, length=9)
    mask = torch.ones_like(input_ids)
    mask[2, :4] = 0
    with torch.no_grad():
        model.set_experts_implementation("eager")
        eager = model(input_ids, attention_mask=mask).logits.float()
        model.set_experts_implementation(implementation)
        other = model(input_ids, attention_mask=mask).logits.float()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(other, eager, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("implementation", ["eager", "sorted_mm", "tiled_mm", "batched_mm", "grouped_mm"])
def test_experts_edge_cases(implementation):
    """Ties in routing scores, one expert picked by every token, experts with no tokens."""
    model = make_model(experts_implementation=implementation)
    block = model.moe_blocks()[0]
    experts = block.routed_experts
    hidden = torch.randn(5, 64)
    top_k_index = torch.tensor([[3, 3], [3, 0], [0, 3], [3, 5], [5, 0]])  # expert 3 repeats; 1, 2, 4, 6, 7 idle
    top_k_weights = torch.full((5, 2), 0.5)  # tied weights
    out = experts(hidden, top_k_index, top_k_weights)

    def expert(e, x):  # nn.Linear layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        gate, up = (experts.gate_up_proj[e] @ x).chunk(2, dim=-1)
        return experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)

    expected = torch.stack(
        [sum(0.5 * expert(e, hidden[t]) for e in top_k_index[t].tolist()) for t in range(5)]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # Tied router scores (all-zero router): selection is still k distinct experts with equal weights.
    with torch.no_grad():
        block.router.weight.zero_()
    _, weights, index = block.router(hidden, torch.zeros(8))
    assert all(len(set(row.tolist())) == 2 for row in index)
    torch.testing.assert_close(weights, torch.full_like(weights, model.config.routed_scaling_factor / 2))


def test_router_and_bias_stay_fp32_under_casts(tmp_path):
    model = make_model()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(dtype=torch.bfloat16, device="cpu")):
        cast(model)
        block = model.moe_blocks()[0]
        assert block.router.weight.dtype == torch.float32
        assert block.expert_bias.dtype == torch.float32
        assert block.routed_experts.gate_up_proj.dtype != torch.float32
        assert model.model.layers[0].self_attn.q_proj.weight.dtype != torch.float32
    model.to(torch.float32).save_pretrained(tmp_path)
    for key in ("dtype", "torch_dtype"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **{key: torch.bfloat16})
        assert loaded.moe_blocks()[0].router.weight.dtype == torch.float32
        assert loaded.moe_blocks()[0].expert_bias.dtype == torch.float32
        assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_router_runs_in_fp32_under_bf16_autocast():
    model = make_model().train()
    input_ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=input_ids, output_router_logits=True)
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    out.loss.backward()
    assert model.moe_blocks()[0].router.weight.grad.dtype == torch.float32


def test_bf16_model_stays_close_to_fp32():
    model = make_model()
    input_ids = tokens()
    with torch.no_grad():
        reference = model(input_ids).logits
        low_precision = copy.deepcopy(model).to(torch.bfloat16)(input_ids).logits.float()
    assert (low_precision - reference).abs().max() < 0.1


def test_router_logits_and_auxiliary_losses():
    model = make_model()
    input_ids = tokens(batch=2, length=8)
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (16, 8)
    assert out.aux_loss > 0
    plain_loss = out.loss

    balanced = make_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    balanced_out = balanced(input_ids, labels=input_ids)  # coefficients switch the router logits on by themselves
    assert balanced_out.router_logits is not None
    z = torch.stack([torch.logsumexp(l, -1).pow(2).mean() for l in balanced_out.router_logits]).mean()
    torch.testing.assert_close(balanced_out.loss, plain_loss + 0.5 * balanced_out.aux_loss + 0.1 * z)


def test_balancing_loss_is_one_for_a_perfectly_balanced_router():
    from modeling_mobilemoe.modeling_mobilemoe import load_balancing_loss_func

    # Four tokens, four experts, top-1: each token prefers a different expert.
    balanced = torch.eye(4) * 5.0
    torch.testing.assert_close(load_balancing_loss_func((balanced,), [torch.zeros(4)], top_k=1), torch.tensor(1.0))
    # Every token picks expert 0: E * (its mean normalised affinity), well above 1.
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 5.0
    affinity_0 = torch.sigmoid(torch.tensor(5.0)) / (torch.sigmoid(torch.tensor(5.0)) + 3 * 0.5)
    torch.testing.assert_close(load_balancing_loss_func((collapsed,), [torch.zeros(4)], top_k=1), 4 * affinity_0)


def test_expert_load_counts_routed_tokens_while_training_only():
    model = make_model()
    input_ids = tokens(batch=2, length=8)
    model(input_ids)
    assert all(block.expert_load.sum() == 0 for block in model.moe_blocks())
    model.train()
    model(input_ids)
    model(input_ids)
    for block in model.moe_blocks():
        assert block.expert_load.sum() == 2 * 16 * model.config.num_experts_per_tok


def test_gradient_checkpointing_gives_same_gradients():
    input_ids = tokens(batch=2, length=8)
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_dense_and_nope_layers():
    model = make_model(num_hidden_layers=4, interleave_moe_layer_step=2, no_rope_layers=[1, 0, 1, 0], layer_types=["full_attention"] * 4)
    assert [layer.is_moe_layer for layer in model.model.layers] == [False, True, False, True]
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [True, False, True, False]
    input_ids = tokens()
    assert torch.isfinite(model(input_ids, labels=input_ids).loss)


def test_save_and_reload_round_trip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_mobilemoe.py").exists() and (tmp_path / "configuration_mobilemoe.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, MobileMoEForCausalLM)
    input_ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    for block, reloaded_block in zip(model.moe_blocks(), reloaded.moe_blocks()):
        assert torch.equal(block.expert_bias, reloaded_block.expert_bias)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_base_model_is_the_backbone():
    model = make_model()
    assert isinstance(model.base_model, MobileMoEModel)
    assert model.get_output_embeddings() is model.lm_head
    hidden = model.model(tokens()).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), model(tokens()).logits)


def test_torch_compile_matches_eager_forward():
    model = make_model()
    input_ids = tokens()
    with torch.no_grad():
        expected = model(input_ids).logits
        compiled = torch.compile(model, backend="eager", fullgraph=False)
        torch.testing.assert_close(compiled(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 40])
@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "pytorch-ops"])
def test_sorted_mm_matches_eager_for_decode_and_prefill_shapes(dtype, num_tokens, cpu_kernels):
    """Single-token decode, a few tokens, and enough rows per expert to take the bf16 upcast path; through the
    package's CPU operators (which `sorted_mm` hands inference to) and through its own PyTorch formulations."""
    experts = make_model().to(dtype).moe_blocks()[0].routed_experts
    hidden = torch.randn(num_tokens, 64, dtype=dtype)
    top_k_weights, top_k_index = torch.rand(num_tokens, 8).topk(2, dim=-1)
    with kernels.enabled(cpu_kernels):
        fast, eager = run_experts(experts, ("sorted_mm", "eager"), hidden, top_k_index, top_k_weights)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), eager.float(), atol=tolerance, rtol=tolerance)


def run_experts(experts, implementations, *inputs) -> list[torch.Tensor]:
    """The experts module's output under each experts implementation, without autograd."""
    outputs = []
    with torch.no_grad():
        for implementation in implementations:
            experts.config._experts_implementation = implementation
            outputs.append(experts(*inputs))
    return outputs


def test_sorted_mm_gradients_match_eager():
    input_ids = tokens(batch=2, length=12)
    grads = {}
    for implementation in ("eager", "sorted_mm"):
        model = make_model(experts_implementation=implementation).train()
        model(input_ids, labels=input_ids).loss.backward()
        grads[implementation] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["sorted_mm"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sorted_mm_is_the_default_and_compiles_fullgraph():
    model = make_model()
    assert model.config._experts_implementation == "sorted_mm"
    input_ids = tokens(batch=1, length=1)
    with torch.no_grad():
        expected = model(input_ids).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
