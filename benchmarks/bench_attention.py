"""The attention of one layer at prefill, each implementation side by side on the same query, key and value tensors,
measured round-robin, each round starting one mode later, median of `--repeats`.

    python benchmarks/bench_attention.py                     # S shape, 1024 tokens, fp32 and bf16, writes JSON + PNG
    python benchmarks/bench_attention.py --tokens 4096 --dtypes bfloat16

Phases: `causal` (one sequence, no mask: transformers passes none and SDPA runs `is_causal`) and `padded` (a batch of
two, the second left-padded by a quarter of its length: transformers' bool mask, rows that see nothing included).
Modes, each called as the model calls its attention function (`module, query, key, value, mask, scaling`):
- `prefill_attention`: the package's CPU attention (`kernels.cpu_sdpa_attention_forward`, what `sdpa` runs on CPU);
- `sdpa`: transformers' `sdpa_attention_forward`, PyTorch's CPU flash attention;
- `eager`: the modeling file's eager attention, whose numerics `prefill_attention` reproduces.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_mobilemoe, median_seconds, phase_benchmark_main, round_robin  # noqa: E402

from modeling_mobilemoe import kernels  # noqa: E402
from modeling_mobilemoe.modeling_mobilemoe import eager_attention_forward  # noqa: E402


MODES = {
    "prefill_attention": kernels.cpu_sdpa_attention_forward,
    "sdpa": sdpa_attention_forward,
    "eager": eager_attention_forward,
}


def attention_inputs(attention, phase: str, tokens: int, dtype: torch.dtype):
    """Random query [B, Hq, T, D], key and value [B, Hkv, T, D] at the layer's shape, and the mask of `phase`."""
    config, batch = attention.config, 1 if phase == "causal" else 2
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(batch, heads, tokens, attention.head_dim, generator=generator, dtype=dtype)
        for heads in (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)
    )
    if phase == "causal":
        return query, key, value, None
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril().expand(batch, 1, tokens, tokens).clone()
    mask[1, ..., : tokens // 4] = False
    return query, key, value, mask


def run_dtype(args, dtype: torch.dtype) -> dict:
    attention = build_mobilemoe(args.size, 1, dtype).model.layers[0].self_attn
    results = {}
    for phase in ("causal", "padded"):
        query, key, value, mask = attention_inputs(attention, phase, args.tokens, dtype)

        def measure(mode: str) -> float:
            def run():
                with torch.no_grad():
                    MODES[mode](attention, query, key, value, mask, scaling=attention.scaling)

            return median_seconds(run, repeats=1, warmup=0)[0]

        results[phase] = round_robin(args.modes, args.repeats, measure)
    return results


def main(argv=None) -> int:
    return phase_benchmark_main(argv, __doc__, "attention", list(MODES), "prefill_attention", run_dtype)


if __name__ == "__main__":
    sys.exit(main())
