"""The routed experts of one MoE layer at prefill length, each implementation side by side on one module: inference (no
autograd) and a training step (forward, and backward of a loss on the output into the hidden states, the routing
weights and the experts' weights), measured round-robin, each round starting one mode later, median of `--repeats`.

    python benchmarks/bench_experts.py                     # S shape, 1024 tokens, fp32 and bf16, writes JSON + PNG
    python benchmarks/bench_experts.py --tokens 256 --dtypes bfloat16

Routing is balanced random top-k (every token picks k distinct experts uniformly), what a load-balanced router gives.
Modes:
- `cpu_fused`: the package's operators (few slots streamed, more a grouped GEMM in C++ with each expert's GEMMs on
  one core; training: `kernels.GroupedExperts`), what the default `sorted_mm` runs on CPU;
- `sorted_mm-pytorch-ops`: the default with the kernels off (a Python loop over the experts that got tokens;
  training: transformers' `grouped_mm`);
- `grouped_mm` and `eager`: transformers' grouped GEMM, and the reference loop of the modeling file.
"""

from __future__ import annotations

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_mobilemoe, median_seconds, phase_benchmark_main, round_robin  # noqa: E402

from modeling_mobilemoe import kernels  # noqa: E402


# mode -> (experts implementation, the package's CPU kernels on)
MODES = {
    "cpu_fused": ("sorted_mm", True),
    "sorted_mm-pytorch-ops": ("sorted_mm", False),
    "grouped_mm": ("grouped_mm", False),
    "eager": ("eager", False),
}


def balanced_routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    top_k_index = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    return top_k_index, torch.rand(tokens, top_k, generator=generator)


def phase_runner(experts, phase: str, hidden_states, top_k_index, top_k_weights):
    """One call of `experts` for `phase` ("inference" or "training")."""
    if phase == "inference":

        def run():
            with torch.no_grad():
                experts(hidden_states, top_k_index, top_k_weights)

        return run
    hidden_states = hidden_states.detach().requires_grad_(True)
    top_k_weights = top_k_weights.detach().requires_grad_(True)

    def run():
        experts(hidden_states, top_k_index, top_k_weights).float().sum().backward()
        hidden_states.grad = top_k_weights.grad = None
        experts.zero_grad(set_to_none=True)

    return run


def run_dtype(args, dtype: torch.dtype) -> dict:
    model = build_mobilemoe(args.size, 1, dtype)
    experts = model.moe_blocks()[0].routed_experts
    top_k_index, top_k_weights = balanced_routing(args.tokens, experts.num_experts, model.config.num_experts_per_tok)
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(args.tokens, experts.hidden_dim, dtype=dtype, generator=generator)
    results = {}
    for phase in ("inference", "training"):
        runs = {mode: phase_runner(experts, phase, hidden_states, top_k_index, top_k_weights) for mode in args.modes}

        def measure(mode: str) -> float:
            implementation, use_kernels = MODES[mode]
            experts.config._experts_implementation = implementation
            with kernels.enabled(use_kernels):
                return median_seconds(runs[mode], repeats=1, warmup=0)[0]

        results[phase] = round_robin(args.modes, args.repeats, measure)
    return results


def main(argv=None) -> int:
    return phase_benchmark_main(argv, __doc__, "experts", list(MODES), "cpu_fused", run_dtype)


if __name__ == "__main__":
    sys.exit(main())
