"""Training-step speed (forward + backward, no optimizer) of MobileMoE vs transformers' Qwen2-MoE (each experts
implementation) and a dense MobileLLM-Pro-shaped Llama, side by side in one process, random weights and tokens.

    python benchmarks/bench_training.py                       # S shape, fp32, batch 2 x 512 tokens
    python benchmarks/bench_training.py --layers 4 --dtypes float32 bfloat16

One model at a time (two full-size fp32 training models do not fit in 24 GiB); the modes of one model (MobileMoE with
and without the package's kernels, ...) are measured round-robin on it, step by step, each round starting one mode
later, so the machine's drifts hit them alike and their ratios are side by side. The median of `--repeats` steps per
mode after a warm-up step of each; peak RSS sampled while the model's modes ran. A mode projected (from a 128-token
probe step) to take longer than `--budget-seconds` per step is reported as too slow, not run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DTYPES,
    MODES,
    PeakRSS,
    add_common_arguments,
    bar_chart,
    build,
    median_seconds,
    rotated,
    select,
    start_report,
    summarize,
    write_json,
)


PROBE_TOKENS = 128
DEFAULT_MODES = ["mobilemoe", "mobilemoe-eager", "qwen2moe-eager", "qwen2moe-grouped_mm", "dense-pro"]


def training_step(model, input_ids):
    def step():
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def run_family(modes: list[str], args, dtype: torch.dtype) -> dict[str, dict]:
    """The modes of one model family on one model: probed, then measured round-robin (see the module docstring)."""
    generator = torch.Generator().manual_seed(0)
    results, steps = {}, {}
    with PeakRSS() as rss:
        model = build(modes[0], args.size, args.layers, dtype).train()
        input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=generator)
        for mode in modes:
            select(model, mode)
            probe = min(median_seconds(training_step(model, input_ids[:1, :PROBE_TOKENS]), repeats=1))
            projected = probe * input_ids.numel() / PROBE_TOKENS
            if projected > args.budget_seconds:
                speed_below = input_ids.numel() / projected
                results[mode] = {"status": "too slow", "projected_s": projected, "tok_s_below": speed_below}
            else:
                steps[mode] = training_step(model, input_ids)
                steps[mode]()  # warm-up
        times = {mode: [] for mode in steps}
        for round_index in range(args.repeats):
            for mode in rotated(list(steps), round_index):
                select(model, mode)
                times[mode] += median_seconds(steps[mode], repeats=1, warmup=0)
        for mode, mode_times in times.items():
            summary = summarize(mode_times)
            results[mode] = {"status": "ok", **summary, "tok_s": input_ids.numel() / summary["median_s"]}
        parameters = model.num_parameters()
        del model, steps
        gc.collect()
    for mode in modes:
        results[mode].update(parameters=parameters, peak_rss_gib=rss.peak / 2**30)
    return {mode: results[mode] for mode in modes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_dtypes=["float32"])
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)

    out, report = start_report("training", args)
    for dtype_name in args.dtypes:
        results = report["results"][dtype_name] = {}
        families: dict[str, list[str]] = {}
        for mode in args.modes:
            families.setdefault(MODES[mode][0], []).append(mode)
        for modes in families.values():
            print(f"[{dtype_name}] {', '.join(modes)} ...", flush=True)
            results.update(run_family(modes, args, DTYPES[dtype_name]))
            for mode in modes:
                entry = results[mode]
                speed = f"{entry['tok_s']:.1f} tok/s" if "tok_s" in entry else f"too slow (< {entry['tok_s_below']:.1f} tok/s)"
                print(f"    {mode}: {speed}, peak RSS {entry['peak_rss_gib']:.2f} GiB", flush=True)
            write_json(out, report)
        results = report["results"][dtype_name] = {mode: results[mode] for mode in args.modes}
        speeds = {mode: entry["tok_s"] for mode, entry in results.items() if "tok_s" in entry}
        qwen = [value for mode, value in speeds.items() if mode.startswith("qwen2moe")]
        if "mobilemoe" in speeds:
            ratios = report["ratios"][dtype_name] = {}
            if qwen:
                ratios["vs_best_qwen2moe"] = speeds["mobilemoe"] / max(qwen)
            if "dense-pro" in speeds:
                ratios["vs_dense_pro"] = speeds["mobilemoe"] / speeds["dense-pro"]
            if "mobilemoe-pytorch-ops" in speeds:  # side by side on one model
                ratios["vs_pytorch_ops"] = speeds["mobilemoe"] / speeds["mobilemoe-pytorch-ops"]
        write_json(out, report)

    print(f"\n{'dtype':<9} {'mode':<28} {'train tok/s':>11} {'peak RSS GiB':>12}")
    for dtype_name, results in report["results"].items():
        for mode, entry in results.items():
            speed = f"{entry['tok_s']:.1f}" if "tok_s" in entry else f"<{entry['tok_s_below']:.1f}"
            print(f"{dtype_name:<9} {mode:<28} {speed:>11} {entry['peak_rss_gib']:>12.2f}")
        for name, value in report["ratios"].get(dtype_name, {}).items():
            print(f"{dtype_name:<9} mobilemoe training speed-up {name}: {value:.2f}x")
    chart = os.path.splitext(out)[0] + ".png"
    panels = {
        f"train step {dtype_name}": {mode: entry["tok_s"] for mode, entry in results.items() if "tok_s" in entry}
        for dtype_name, results in report["results"].items()
    }
    bar_chart(chart, f"MobileMoE-{args.size} training step ({args.batch}x{args.seq_len} tokens), {args.threads} threads", panels, "tokens / s")
    print(f"wrote {out} and {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
