"""Prefill and decode speed of MobileMoE vs transformers' Qwen2-MoE (every experts implementation), a loop over all
experts, and a dense MobileLLM-Pro-shaped Llama, side by side in one process, batch 1, random weights.

    python benchmarks/bench_inference.py                      # S shape, fp32 and bf16, writes JSON + PNG
    python benchmarks/bench_inference.py --layers 4 --rounds 2    # a quicker, shortened run

- prefill: one forward over `--prefill-tokens` tokens with `use_cache=True, logits_to_keep=1` (what `generate` does);
- decode: one-token forwards against a static KV cache holding `--context` tokens (filled with random keys/values,
  which cost the same to attend to as real ones), the cache cropped back after each step;
- modes are measured round-robin (every model stays loaded; modes of one model switch its experts implementation),
  each round starting one mode later, so slow drifts of a shared machine hit all modes alike; the
  loop-over-all-experts baseline, which needs an extra copy of the experts, runs after the rounds;
- the median over all rounds; the RSS a mode adds while it runs (what its path materialises) and the RSS of the
  loaded models; memory bandwidth measured in every round (the median counts), so decode speed can be put against
  the bandwidth limit (active weight + KV bytes per token) as the machine was while the modes ran.
A mode projected to take longer than `--budget-seconds` for one prefill is reported as too slow, not run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch
from transformers import StaticCache


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DTYPES,
    MODES,
    PeakRSS,
    add_common_arguments,
    bar_chart,
    build,
    drop_published_layout_copies,
    median_seconds,
    memory_bandwidth,
    rotated,
    select,
    start_report,
    summarize,
    write_json,
)


PROBE_TOKENS = 64


def random_cache(model, context: int) -> StaticCache:
    """A static KV cache (no per-step reallocation, as `cache_implementation="static"` generation uses) holding
    `context` random tokens, with room for one more."""
    config = model.config
    cache = StaticCache(config=config, max_cache_len=context + 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, context, head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=model.dtype), torch.randn(shape, dtype=model.dtype), layer)
    return cache


def prefill_runner(model, tokens: int):
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    def run(length: int = tokens):
        with torch.no_grad():
            model(input_ids[:, :length], use_cache=True, logits_to_keep=1)

    return run


def decode_runner(model, context: int):
    cache = random_cache(model, context)
    token, position_ids = torch.tensor([[1]]), torch.tensor([[context]])

    def step():
        with torch.no_grad():
            model(token, cache=cache, position_ids=position_ids, use_cache=True)
        cache.crop(-1)  # back to `context` tokens

    return step


def active_bytes_per_token(model, context: int) -> dict:
    """Weight bytes one decode step reads (MoE: only the selected experts) and the KV cache bytes it attends to."""
    config = model.config
    element = torch.finfo(model.dtype).bits // 8
    if hasattr(config, "num_active_parameters"):
        weights = config.num_active_parameters() * element
    else:
        num_experts = getattr(config, "num_experts", 0)
        unselected = 0
        if num_experts:
            per_expert = 3 * config.hidden_size * config.moe_intermediate_size
            unselected = config.num_hidden_layers * (num_experts - config.num_experts_per_tok) * per_expert
        weights = (model.num_parameters() - unselected) * element
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * element
    return {"weights": weights, "kv_cache": kv}


def check_against_eager(model) -> float:
    """Max |logit| difference between the mode's experts implementation and the eager reference path."""
    input_ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(input_ids).logits.float()
        implementation = model.config._experts_implementation
        model.set_experts_implementation("eager")
        reference = model(input_ids).logits.float()
        model.set_experts_implementation(implementation)
    return (fast - reference).abs().max().item()


class ModeRecorder:
    """Timings and the extra RSS of one mode, accumulated over rounds."""

    def __init__(self):
        self.times: dict[str, list[float]] = {"decode": [], "prefill": []}
        self.extra_rss: dict[str, int] = {"decode": 0, "prefill": 0}

    def measure(self, phase: str, fn, repeats: int, warmup: int) -> None:
        with PeakRSS() as rss:
            self.times[phase] += median_seconds(fn, repeats, warmup=warmup)
        self.extra_rss[phase] = max(self.extra_rss[phase], rss.peak - rss.start)

    def result(self, phase: str, tokens_per_run: int) -> dict:
        times = self.times[phase]
        summary = summarize(times)
        return {"status": "ok", **summary, "tok_s": tokens_per_run / summary["median_s"], "extra_rss_gib": self.extra_rss[phase] / 2**30}


def run_dtype(args, dtype: torch.dtype) -> dict:
    families = sorted({MODES[mode][0] for mode in args.modes})
    with PeakRSS() as loading:
        models = {family: build(next(m for m in args.modes if MODES[m][0] == family), args.size, args.layers, dtype) for family in families}
    results = {mode: {} for mode in args.modes}
    recorders = {mode: ModeRecorder() for mode in args.modes}
    decoders = {family: decode_runner(model, args.context) for family, model in models.items()}
    prefills = {family: prefill_runner(model, args.prefill_tokens) for family, model in models.items()}
    interleaved = [mode for mode in args.modes if mode != "mobilemoe-loop-all-experts"]
    bandwidth, previous_family = [], None

    for mode in args.modes:
        family = MODES[mode][0]
        model = models[family]
        select(model, mode)
        results[mode]["parameters"] = model.num_parameters()
        results[mode]["bytes_per_token"] = active_bytes_per_token(model, args.context)
        if family == "mobilemoe":
            results[mode]["max_abs_diff_vs_eager"] = check_against_eager(model)
        results[mode]["prefill"] = prefill_plan(mode, model, prefills[family], args, dtype)
        if mode == "mobilemoe-loop-all-experts":
            drop_published_layout_copies(model)

    for round_index in range(args.rounds):
        for mode in rotated(interleaved, round_index):
            family = MODES[mode][0]
            select(models[family], mode)
            recorders[mode].measure("decode", decoders[family], args.decode_steps, warmup=2)
            if results[mode]["prefill"]["status"] == "pending":
                # A warm-up prefill in round one (it creates oneDNN's kernels for its shapes) and after every switch
                # of model: the first prefill after another model's took 1-7% longer than the next one (full S,
                # fp32), a cost that would fall on whichever mode follows a switch.
                warmup = round_index == 0 or family != previous_family
                recorders[mode].measure("prefill", prefills[family], 1, warmup=int(warmup))
            previous_family = family
        # The bandwidth limit is measured in every round too, so it sees the machine as the modes did (a shared
        # machine's bandwidth drifts by tens of percent within a run).
        bandwidth.append(memory_bandwidth(megabytes=512))
        print(f"    round {round_index + 1}/{args.rounds} done", flush=True)
    for family in [family for family in models if family != "mobilemoe"]:  # room for the baseline's expert copies
        del models[family], decoders[family], prefills[family]
    gc.collect()
    if "mobilemoe-loop-all-experts" in args.modes:
        mode = "mobilemoe-loop-all-experts"
        select(models["mobilemoe"], mode)
        recorders[mode].measure("decode", decoders["mobilemoe"], args.decode_steps, warmup=2)
        if results[mode]["prefill"]["status"] == "pending":
            recorders[mode].measure("prefill", prefills["mobilemoe"], 1, warmup=0)  # far behind: one run tells
        drop_published_layout_copies(models["mobilemoe"])

    for mode in args.modes:
        results[mode]["decode"] = recorders[mode].result("decode", 1)
        if results[mode]["prefill"]["status"] == "pending":
            results[mode]["prefill"] = recorders[mode].result("prefill", args.prefill_tokens)
    return {"modes": results, "models_rss_gib": loading.peak / 2**30, "memory_bandwidth": bandwidth}


def prefill_plan(mode: str, model, run, args, dtype: torch.dtype) -> dict:
    """'pending' when the mode's prefill will be measured; otherwise why not (too slow, or would not fit)."""
    if mode.endswith("batched_mm"):
        gathered = args.prefill_tokens * model.config.num_experts_per_tok * 3 * model.config.hidden_size
        gathered *= model.config.moe_intermediate_size * dtype.itemsize
        if gathered > args.gather_limit_gb * 1e9:
            return {"status": "skipped", "reason": f"batched_mm gathers one expert weight copy per (token, expert) slot: ~{gathered / 1e9:.0f} GB per layer"}
    probe = min(median_seconds(lambda: run(PROBE_TOKENS), repeats=2))
    projected = probe * args.prefill_tokens / PROBE_TOKENS
    if projected > args.budget_seconds:
        return {"status": "too slow", "projected_s": projected, "tok_s_below": args.prefill_tokens / projected}
    return {"status": "pending", "projected_s": projected}


def add_bandwidth_shares(results: dict[str, dict], bandwidth: dict[str, float]) -> None:
    """Each mode's decode traffic (active weight + KV bytes per token x tok/s) as a share of the memory bandwidth
    measured in the same rounds."""
    for entry in results.values():
        moved = entry["bytes_per_token"]["weights"] + entry["bytes_per_token"]["kv_cache"]
        for kind in ("read", "copy"):
            share = moved * entry["decode"]["tok_s"] / (bandwidth[f"{kind}_gb_s"] * 1e9)
            entry["decode"][f"fraction_of_{kind}_bandwidth"] = share


def ratios(results: dict[str, dict], phase: str) -> dict[str, float]:
    def speed(mode):
        entry = results.get(mode, {}).get(phase, {})
        return entry.get("tok_s")

    ours = speed("mobilemoe")
    out = {}
    if ours is None:
        return out
    if speed("mobilemoe-pytorch-ops"):
        out["vs_pytorch_ops"] = ours / speed("mobilemoe-pytorch-ops")
    if speed("mobilemoe-avx2-kernels"):
        out["vs_avx2_kernels"] = ours / speed("mobilemoe-avx2-kernels")
    if speed("mobilemoe-no-amx"):
        out["vs_no_amx"] = ours / speed("mobilemoe-no-amx")
    if speed("dense-pro"):
        out["vs_dense_pro"] = ours / speed("dense-pro")
    qwen = [speed(mode) for mode in results if mode.startswith("qwen2moe") and speed(mode)]
    if qwen:
        out["vs_best_qwen2moe"] = ours / max(qwen)
    if speed("mobilemoe-loop-all-experts"):
        out["vs_loop_all_experts"] = ours / speed("mobilemoe-loop-all-experts")
    elif results.get("mobilemoe-loop-all-experts", {}).get(phase, {}).get("tok_s_below"):
        out["vs_loop_all_experts_at_least"] = ours / results["mobilemoe-loop-all-experts"][phase]["tok_s_below"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_dtypes=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--context", type=int, default=1024, help="KV cache length for decode")
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (one prefill per mode and round)")
    parser.add_argument("--budget-seconds", type=float, default=240.0, help="skip a prefill projected to take longer")
    parser.add_argument("--gather-limit-gb", type=float, default=4.0)
    args = parser.parse_args(argv)

    out, report = start_report("inference", args)
    print(f"machine: {report['machine']}")
    for dtype_name in args.dtypes:
        print(f"[{dtype_name}] {', '.join(args.modes)}", flush=True)
        measured = run_dtype(args, DTYPES[dtype_name])
        gc.collect()  # this dtype's models go before the next dtype's are built
        results = report["results"][dtype_name] = measured["modes"]
        report.setdefault("models_rss_gib", {})[dtype_name] = measured["models_rss_gib"]
        samples = measured["memory_bandwidth"]
        bandwidth = {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}
        report.setdefault("memory_bandwidth", {})[dtype_name] = {**bandwidth, "per_round": samples}
        print(f"memory bandwidth (median of the rounds): {bandwidth}", flush=True)
        add_bandwidth_shares(results, bandwidth)
        report["ratios"][dtype_name] = {phase: ratios(results, phase) for phase in ("decode", "prefill")}
        write_json(out, report)

    print_table(report)
    chart = os.path.splitext(out)[0] + ".png"
    panels = {}
    for dtype_name, results in report["results"].items():
        for phase in ("decode", "prefill"):
            panels[f"{phase} {dtype_name}"] = {
                mode: entry[phase]["tok_s"] for mode, entry in results.items() if "tok_s" in entry[phase]
            }
    title = f"MobileMoE-{args.size} vs baselines, batch 1, {args.threads} threads" + (f", {args.layers} layers" if args.layers else "")
    bar_chart(chart, title, panels, "tokens / s")
    print(f"wrote {out} and {chart}")
    return 0


def print_table(report: dict) -> None:
    print(f"\n{'dtype':<9} {'mode':<28} {'decode tok/s':>12} {'% read BW':>9} {'prefill tok/s':>13} {'+RSS GiB':>8}")
    for dtype_name, results in report["results"].items():
        for mode, entry in results.items():
            prefill = entry["prefill"]
            prefill_text = f"{prefill['tok_s']:.1f}" if "tok_s" in prefill else f"<{prefill['tok_s_below']:.1f}" if "tok_s_below" in prefill else "-"
            extra = max(entry["decode"]["extra_rss_gib"], prefill.get("extra_rss_gib", 0.0))
            print(
                f"{dtype_name:<9} {mode:<28} {entry['decode']['tok_s']:>12.2f} "
                f"{entry['decode']['fraction_of_read_bandwidth']:>9.0%} {prefill_text:>13} {extra:>8.2f}"
            )
        for phase, values in report["ratios"].get(dtype_name, {}).items():
            print(f"{dtype_name:<9} mobilemoe {phase} speed-up: " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))


if __name__ == "__main__":
    sys.exit(main())
