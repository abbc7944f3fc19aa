"""Shared pieces of the benchmarks: the models compared, timing, peak-RSS sampling, memory bandwidth, output files.

Models are built from configs with random weights (nothing is downloaded):
- `mobilemoe`: this package's MobileMoE at a preset's shape, with its CPU decode kernels on the CPU's best instruction
  set (`mobilemoe-avx2-kernels`: capped at AVX2, fp32 GEMMs on MKL, as an AVX2-only CPU runs it; `mobilemoe-no-amx`:
  capped below AMX tiles, at AVX-512 BF16; `mobilemoe-pytorch-ops`: without them, stock PyTorch ops only);
- `qwen2moe`: transformers' `Qwen2MoeForCausalLM` at the same shape (60 experts, top-4, shared expert 4x wider);
- `dense-pro`: a dense `LlamaForCausalLM` shaped like MobileLLM-Pro (1.08B: 30 layers, hidden 1280, 20/4 heads,
  FFN 6144, vocab 202048, tied), the paper's on-device baseline.
`--layers N` shortens every model in proportion (dense: round(30 * N / MoE layers)).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.integrations.moe import ExpertsInterface

from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM, kernels
from modeling_mobilemoe.configuration_mobilemoe import DEFAULT_ROPE_PARAMETERS


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRO_LAYERS = 30


def mobilemoe_config(size: str, layers: int | None) -> MobileMoEConfig:
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    return MobileMoEConfig.from_preset(size, **overrides)


def build_mobilemoe(size: str, layers: int | None, dtype: torch.dtype):
    return MobileMoEForCausalLM._from_config(mobilemoe_config(size, layers), dtype=dtype).eval()


def build_qwen2moe(size: str, layers: int | None, dtype: torch.dtype):
    moe = mobilemoe_config(size, layers)
    config = Qwen2MoeConfig(
        vocab_size=moe.vocab_size,
        hidden_size=moe.hidden_size,
        num_hidden_layers=moe.num_hidden_layers,
        num_attention_heads=moe.num_attention_heads,
        num_key_value_heads=moe.num_key_value_heads,
        moe_intermediate_size=moe.intermediate_size,
        shared_expert_intermediate_size=moe.intermediate_size_mlp,
        intermediate_size=moe.intermediate_size_mlp,
        num_experts=moe.num_local_experts,
        num_experts_per_tok=moe.num_experts_per_tok,
        norm_topk_prob=True,
        qkv_bias=False,
        tie_word_embeddings=True,
        max_position_embeddings=moe.max_position_embeddings,
        rope_parameters=dict(moe.rope_parameters),
    )
    return Qwen2MoeForCausalLM._from_config(config, dtype=dtype).eval()


def build_dense_pro(size: str, layers: int | None, dtype: torch.dtype):
    moe_layers = mobilemoe_config(size, None).num_hidden_layers
    num_layers = PRO_LAYERS if layers is None else max(1, round(PRO_LAYERS * layers / moe_layers))
    config = LlamaConfig(
        vocab_size=202048,
        hidden_size=1280,
        intermediate_size=6144,
        num_hidden_layers=num_layers,
        num_attention_heads=20,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_parameters=dict(DEFAULT_ROPE_PARAMETERS),
    )
    return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def loop_all_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Baseline: what the released remote code does, a Python loop over all experts with `x @ W[e]` on the released
    `[E, in, out]` layout (kept in `published_gate_up`/`published_down`, see `add_published_layout_copies`)."""
    output = torch.zeros_like(hidden_states)
    for expert in range(self.num_experts):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        gate, up = (hidden_states[token_idx] @ self.published_gate_up[expert]).chunk(2, dim=-1)
        expert_out = (self.act_fn(gate) * up) @ self.published_down[expert]
        output.index_add_(0, token_idx, (expert_out * top_k_weights[token_idx, slot, None]).to(output.dtype))
    return output


def add_published_layout_copies(model) -> None:
    """Give each experts module the released `[E, in, out]` tensors the loop-over-all-experts baseline reads."""
    for block in model.moe_blocks():
        experts = block.routed_experts
        experts.published_gate_up = experts.gate_up_proj.detach().transpose(1, 2).contiguous()
        experts.published_down = experts.down_proj.detach().transpose(1, 2).contiguous()


def drop_published_layout_copies(model) -> None:
    for block in model.moe_blocks():
        del block.routed_experts.published_gate_up, block.routed_experts.published_down
    gc.collect()


ExpertsInterface.register("loop_all_experts", loop_all_experts_forward)

FAMILIES: dict[str, Callable] = {"mobilemoe": build_mobilemoe, "qwen2moe": build_qwen2moe, "dense-pro": build_dense_pro}
# mode -> (model family, experts implementation (None: the model's default), MobileMoE's CPU decode kernels: False
# (off), True (on, with the CPU's best instruction set) or the instruction set they are capped at). The loop over all
# experts stands for the released remote code, so it runs on stock PyTorch ops.
MODES: dict[str, tuple[str, str | None, bool | str]] = {
    "mobilemoe": ("mobilemoe", None, True),
    "mobilemoe-avx2-kernels": ("mobilemoe", None, "avx2"),
    "mobilemoe-no-amx": ("mobilemoe", None, "avx512_bf16"),
    "mobilemoe-pytorch-ops": ("mobilemoe", None, False),
    "mobilemoe-eager": ("mobilemoe", "eager", True),
    "mobilemoe-grouped_mm": ("mobilemoe", "grouped_mm", True),
    "mobilemoe-loop-all-experts": ("mobilemoe", "loop_all_experts", False),
    "qwen2moe-eager": ("qwen2moe", "eager", False),
    "qwen2moe-batched_mm": ("qwen2moe", "batched_mm", False),
    "qwen2moe-grouped_mm": ("qwen2moe", "grouped_mm", False),
    "dense-pro": ("dense-pro", None, False),
}


def build(mode: str, size: str, layers: int | None, dtype: torch.dtype):
    """The model of `mode`'s family, switched to the mode's experts implementation."""
    family = MODES[mode][0]
    torch.manual_seed(0)
    model = FAMILIES[family](size, layers, dtype)
    select(model, mode)
    return model


def select(model, mode: str) -> None:
    """Switch a family's model to `mode`: its experts implementation (with the baseline's extra tensors if needed)
    and the CPU decode kernels on or off (they only exist in MobileMoE models)."""
    family, experts, use_kernels = MODES[mode]
    kernels.set_enabled(bool(use_kernels))
    if kernels.available():
        kernels.set_instruction_set(use_kernels if isinstance(use_kernels, str) else "native")
        kernels.set_float32_gemms("aten" if use_kernels == "avx2" else "native")  # see `set_float32_gemms`
    if family == "dense-pro":
        return
    if experts == "loop_all_experts" and not hasattr(model.moe_blocks()[0].routed_experts, "published_gate_up"):
        add_published_layout_copies(model)
    model.set_experts_implementation(experts or ("sorted_mm" if family == "mobilemoe" else "grouped_mm"))


def rotated(modes: list[str], round_index: int) -> list[str]:
    """`modes` in the order round `round_index` runs them: each round starts one mode later, so whatever the previous
    mode leaves behind (freed memory the allocator must fault in again, caches, a drift of the machine) falls on a
    different mode each round rather than always on the first."""
    shift = round_index % len(modes) if modes else 0
    return modes[shift:] + modes[:shift]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def round_robin(modes: list[str], repeats: int, measure: Callable[[str], float]) -> dict[str, dict]:
    """Summaries (`summarize`) of `repeats` calls of `measure(mode)` (the seconds of one run of `mode`) per mode,
    measured round-robin after a warm-up round, each round starting one mode later (`rotated`)."""
    times = {mode: [] for mode in modes}
    for round_index in range(repeats + 1):  # round 0 warms every mode up
        for mode in rotated(modes, round_index):
            elapsed = measure(mode)
            if round_index:
                times[mode].append(elapsed)
    return {mode: summarize(mode_times) for mode, mode_times in times.items()}


def report_phases(report: dict, out: str, subject: str, title: str) -> None:
    """For a report whose results are {dtype: {phase: {mode: summary}}}: `subject`'s speed-up over every other mode
    per phase into its ratios, the JSON, a table, and a PNG chart beside the JSON (one panel per phase and dtype)."""
    for dtype_name, phases in report["results"].items():
        report["ratios"][dtype_name] = {
            phase: {
                f"vs_{mode}": entries[mode]["median_s"] / entries[subject]["median_s"]
                for mode in entries
                if mode != subject
            }
            for phase, entries in phases.items()
            if subject in entries
        }
    write_json(out, report)
    print(f"\n{'dtype':<9} {'phase':<10} {'mode':<24} {'median ms':>10} {'min ms':>8}")
    for dtype_name, phases in report["results"].items():
        for phase, entries in phases.items():
            for mode, entry in entries.items():
                median, fastest = entry["median_s"] * 1e3, entry["min_s"] * 1e3
                print(f"{dtype_name:<9} {phase:<10} {mode:<24} {median:>10.1f} {fastest:>8.1f}")
            for name, value in report["ratios"][dtype_name].get(phase, {}).items():
                print(f"{dtype_name:<9} {phase:<10} {subject} speed-up {name}: {value:.2f}x")
    chart = os.path.splitext(out)[0] + ".png"
    panels = {
        f"{phase} {dtype_name}": {mode: entry["median_s"] * 1e3 for mode, entry in entries.items()}
        for dtype_name, phases in report["results"].items()
        for phase, entries in phases.items()
    }
    bar_chart(chart, title, panels, "ms (lower is better)")
    print(f"wrote {out} and {chart}")


def phase_benchmark_main(argv, description: str, benchmark: str, modes: list[str], subject: str, run_dtype) -> int:
    """The command line of a benchmark of one layer's component (`bench_experts.py`, `bench_attention.py`): options,
    `run_dtype(args, dtype)` ({phase: {mode: summary}}) per dtype, then `report_phases` against `subject`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_dtypes=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", default=modes, choices=modes)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    out, report = start_report(benchmark, args)
    for dtype_name in args.dtypes:
        print(f"[{dtype_name}] {', '.join(args.modes)} ...", flush=True)
        report["results"][dtype_name] = run_dtype(args, DTYPES[dtype_name])
    title = f"MobileMoE-{args.size} {benchmark} of one layer, {args.tokens} tokens, {args.threads} threads"
    report_phases(report, out, subject, title)
    return 0


class PeakRSS:
    """Samples this process's resident set size in a background thread: `start` on entry, `peak` the highest value
    seen (bytes)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def memory_bandwidth(megabytes: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Copy bandwidth (STREAM convention: bytes read + bytes written per second) and read bandwidth (a sum over a
    buffer far larger than the caches), in GB/s, with the benchmark's thread count."""
    numel = megabytes * 2**20 // 4
    source, target = torch.ones(numel), torch.empty(numel)
    copy = min(median_seconds(lambda: target.copy_(source), repeats))
    read = min(median_seconds(lambda: source.sum(), repeats))
    return {"copy_gb_s": 2 * numel * 4 / copy / 1e9, "read_gb_s": numel * 4 / read / 1e9}


def machine_info(threads: int) -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            first_cpu = cpuinfo.read().split("\n\n")[0]
        lines = (line.partition(":") for line in first_cpu.splitlines())
        fields = {key.strip(): value.strip() for key, _, value in lines}
        cpu, flags = fields["model name"], fields["flags"].split()
    except (OSError, KeyError):
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_matmul": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "amx_bf16": "amx_bf16" in flags,  # PyTorch's SDPA runs bf16 on AMX tiles; the package hands it bf16 prefill
        "kernels_instruction_set": kernels.instruction_set(),
        "float32_gemms": kernels.float32_gemms(),
        "threads": threads,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def add_common_arguments(parser, default_dtypes: list[str]) -> None:
    """The options every benchmark takes: shape, length, dtypes, threads, output path."""
    parser.add_argument("--size", default="S", choices=["S", "M", "L"])
    parser.add_argument("--layers", type=int, help="shorten every model to this many MoE layers (dense in proportion)")
    parser.add_argument("--dtypes", nargs="+", default=default_dtypes, choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<benchmark>_<size>.json)")


def start_report(benchmark: str, args) -> tuple[str, dict]:
    """Pins the thread count; returns the JSON path and the report header (settings and machine)."""
    torch.set_num_threads(args.threads)
    suffix = f"{args.size}" + (f"_{args.layers}layers" if args.layers else "")
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{benchmark}_{suffix}.json")
    report = {
        "benchmark": benchmark,
        "size": args.size,
        "layers": args.layers,
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "machine": machine_info(args.threads),
        "results": {},
        "ratios": {},
    }
    return args.out or default, report


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def bar_chart(path: str, title: str, panels: dict[str, dict[str, float]], ylabel: str) -> None:
    """One panel per entry of `panels` ({panel: {mode: value}}), bars per mode, value labels on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (panel, values) in zip(axes[0], panels.items()):
        names = list(values)
        colors = ["tab:green" if name == "mobilemoe" else "tab:gray" if "dense" in name else "tab:blue" for name in names]
        bars = axis.bar(range(len(names)), [values[name] for name in names], color=colors)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
        axis.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        axis.set_title(panel)
        axis.set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
