"""Exported MobileMoE vs the dense MobileLLM-Pro shape, both exported the same way, on every runtime that runs here.

    python benchmarks/bench_export.py                                  # S vs Pro, ONNX Runtime and ExecuTorch
    python benchmarks/bench_export.py --layers 2 --runtimes onnx --repeats 1 --prefill 128   # a quick smoke run

Both models are exported with `mobilemoe export --quantize 8da4w` (random weights): INT4 group-32 weights for every
linear, expert and the embedding, the MoE as the sparse `tiled_mm` path. The dense baseline is MobileLLM-Pro's shape
(30 layers, hidden 1280, 20/4 heads, FFN 6144, vocab 202048, tied) written as an all-dense MobileMoE config, so it goes
through exactly the same exporter and kernels. Activations: ONNX Runtime's MatMulNBits computes in fp32; XNNPACK's
8da4w linears quantize them to INT8 per token. Each (model, runtime) pair is measured in a fresh process, batch 1:
- prefill: `--prefill` tokens from an empty cache, in one call (ExecuTorch: calls of `--max-chunk`) (median of
  `--repeats`);
- decode: one-token calls after a `--context`-token prefill (median of `--decode-steps`);
- peak RSS of that process; with `--long-context N`, also the peak RSS and decode speed after a prefill of N tokens of
  the bundled long documents (real text through the bundled tokenizer, in 1024-token chunks).
ExecuTorch programs take at most `--max-chunk` tokens a call (the runner prefills longer prompts in chunks, as
ExecuTorch's LLM runner does) and attend through ExecuTorch's `custom_sdpa` unless `--sdpa stock`.
Writes JSON and a PNG next to the other results, prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PRO_LAYERS, PeakRSS, bar_chart, mobilemoe_config, start_report, summarize, write_json  # noqa: E402

from modeling_mobilemoe import MobileMoEForCausalLM  # noqa: E402

RUNTIMES = ("onnx", "executorch")
MODELS = ("mobilemoe", "dense-pro")
CHUNK = 1024


def dense_pro_config(size: str, layers: int | None):
    """MobileLLM-Pro's shape as an all-dense MobileMoE config (no layer is an MoE layer)."""
    moe_layers = mobilemoe_config(size, None).num_hidden_layers
    num_layers = PRO_LAYERS if layers is None else max(1, round(PRO_LAYERS * layers / moe_layers))
    return mobilemoe_config(size, None).__class__.from_preset(
        size, num_hidden_layers=num_layers, hidden_size=1280, num_attention_heads=20, num_key_value_heads=4,
        intermediate_size_mlp=6144, vocab_size=202048, interleave_moe_layer_step=num_layers + 1,
        no_rope_layers=[1] * num_layers, layer_types=["full_attention"] * num_layers,
    )  # fmt: skip


def export_one(name: str, runtime: str, args, folder: Path) -> dict:
    from modeling_mobilemoe.export import export_model

    config = mobilemoe_config(args.size, args.layers) if name == "mobilemoe" else dense_pro_config(args.size, args.layers)
    accounting = {
        "parameters": config.num_parameters(),
        "active_parameters": config.num_active_parameters(),
        "int4_weight_bytes": config.int4_weight_bytes(),  # before the export unties the head from the embedding
    }
    torch.manual_seed(0)
    model = MobileMoEForCausalLM._from_config(config, dtype=torch.float32)
    max_seq_len = min(max(args.long_context, max(args.prefill), args.context) + args.decode_steps + 2,
                      config.max_position_embeddings)  # fmt: skip
    options = {"custom_sdpa": args.sdpa == "custom", "max_chunk": args.max_chunk} if runtime == "executorch" else {}
    start = time.perf_counter()
    path = export_model(
        model, folder, format=runtime, quantize="8da4w", max_seq_len=max_seq_len,
        **options,
    )  # fmt: skip
    return {
        "export_s": time.perf_counter() - start,
        "file_mib": sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(path.name)) / 2**20,
        **accounting,
    }


class Session:
    """One runtime's calls behind one interface: `prefill(ids)` from an empty cache, `step(token)` after it."""

    def __init__(self, runtime: str, folder: Path, threads: int):
        from modeling_mobilemoe.export import ExecuTorchRunner, OnnxRunner

        self.runtime = runtime
        self.runner = OnnxRunner(folder, num_threads=threads) if runtime == "onnx" else ExecuTorchRunner(folder)

    def prefill(self, input_ids: torch.Tensor, chunk: int | None = None) -> None:
        chunk = chunk or input_ids.shape[1]
        self.length = 0
        if self.runtime == "onnx":
            import numpy as np

            self.past, self.mask = self.runner.empty_past(1), np.ones((1, 0), dtype=np.int64)
        for start in range(0, input_ids.shape[1], chunk):
            self._call(input_ids[:, start : start + chunk])

    def step(self, token: int = 7) -> None:
        self._call(torch.tensor([[token]]))

    def _call(self, input_ids: torch.Tensor) -> None:
        if self.runtime == "onnx":
            import numpy as np

            self.mask = np.ones((1, self.mask.shape[1] + input_ids.shape[1]), dtype=np.int64)
            _, self.past = self.runner.forward(input_ids.numpy(), self.mask, self.past)
        else:
            self.runner.forward(input_ids, self.length)
        self.length += input_ids.shape[1]


def timed(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summarize(times)


def long_prompt(length: int, vocab_size: int) -> torch.Tensor:
    """`length` tokens of real text: the bundled long documents through the bundled tokenizer."""
    from transformers import AutoTokenizer

    from modeling_mobilemoe.tokenizer_training import shipped_tokenizer_path
    from modeling_mobilemoe.training.data import load_source

    tokenizer = AutoTokenizer.from_pretrained(shipped_tokenizer_path())
    ids = []
    for document in load_source({"path": "bundled:long"})["text"]:
        ids += tokenizer(document)["input_ids"]
        if len(ids) >= length:
            break
    return torch.tensor([ids[:length]]) % vocab_size


def measure(runtime: str, folder: Path, args) -> dict:
    """Runs in a fresh process: every number of one (model, runtime) pair."""
    torch.set_num_threads(args.threads)
    result = {}
    with PeakRSS() as rss:
        session = Session(runtime, folder, args.threads)
        result["loaded_rss_gib"] = (rss._process.memory_info().rss) / 2**30
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        prompt = lambda n: torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n))  # noqa: E731
        session.prefill(prompt(8))  # warm-up
        result["prefill"] = {}
        for length in args.prefill:
            entry = timed(lambda: session.prefill(prompt(length)), args.repeats)
            result["prefill"][str(length)] = {**entry, "tok_s": length / entry["median_s"]}
        session.prefill(prompt(args.context), chunk=CHUNK)
        steps = timed(session.step, args.decode_steps)
        result["decode"] = {**steps, "context": args.context, "tok_s": 1 / steps["median_s"]}
    result["peak_rss_gib"] = rss.peak / 2**30
    if args.long_context:
        max_seq_len = json.loads((folder / "export_config.json").read_text())["max_seq_len"]
        long_steps = max(2, args.decode_steps // 4)
        long_context = min(args.long_context, max_seq_len - long_steps)  # room for the decode steps
        with PeakRSS() as rss:
            session.prefill(long_prompt(long_context, vocab), chunk=CHUNK)
            steps = timed(session.step, long_steps)
        result["long_context"] = {"context": long_context, "peak_rss_gib": rss.peak / 2**30,
                                  "decode_tok_s": 1 / steps["median_s"]}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="S", choices=["S", "M", "L"])
    parser.add_argument("--layers", type=int, help="shorten both models (dense in proportion)")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--prefill", nargs="+", type=int, default=[128, 512, 1024])
    parser.add_argument("--context", type=int, default=1024, help="tokens in the cache while decoding")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--long-context", type=int, default=0, help="also peak RSS and decode at this context")
    parser.add_argument("--sdpa", default="custom", choices=["custom", "stock"],
                        help="ExecuTorch attention: its custom_sdpa (default) or transformers' SDPA over the static cache")
    parser.add_argument("--max-chunk", type=int, default=None, help="ExecuTorch: most tokens per call (default 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir", default=None, help="where the exports go (default: a temporary folder)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, metavar=("RUNTIME", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args)))
        return

    path, report = start_report("export", args)
    report["settings"].pop("child")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_export_"))
    for runtime in args.runtimes:
        report["results"][runtime] = {}
        for name in MODELS:
            folder = work / f"{runtime}_{name}"
            entry = export_one(name, runtime, args, folder)
            child = [sys.executable, __file__, "--child", runtime, str(folder), *sys.argv[1:]]
            finished = subprocess.run(child, capture_output=True, text=True)
            if finished.returncode:
                raise RuntimeError(f"measuring {runtime} {name} failed:\n{finished.stderr[-3000:]}")
            output = finished.stdout
            entry.update(json.loads(output.strip().splitlines()[-1]))
            report["results"][runtime][name] = entry
            print(f"{runtime:<11} {name:<10} export {entry['export_s']:6.0f} s  file {entry['file_mib']:7.0f} MiB  "
                  f"decode {entry['decode']['tok_s']:6.2f} tok/s  "
                  + "  ".join(f"prefill@{n} {v['tok_s']:7.1f}" for n, v in entry["prefill"].items())
                  + f"  peak RSS {entry['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
        moe, dense = report["results"][runtime]["mobilemoe"], report["results"][runtime]["dense-pro"]
        report["ratios"][runtime] = {
            "decode": moe["decode"]["tok_s"] / dense["decode"]["tok_s"],
            **{f"prefill@{n}": moe["prefill"][n]["tok_s"] / dense["prefill"][n]["tok_s"] for n in moe["prefill"]},
        }
        print(f"{runtime}: MobileMoE / dense " + "  ".join(f"{k} {v:.2f}x" for k, v in report["ratios"][runtime].items()))
    write_json(path, report)
    panels = {
        f"{runtime}: {metric} tok/s": {
            name: (entry["decode"]["tok_s"] if metric == "decode" else entry["prefill"][metric.split("@")[1]]["tok_s"])
            for name, entry in report["results"][runtime].items()
        }
        for runtime in args.runtimes
        for metric in ["decode", *(f"prefill@{n}" for n in args.prefill)]
    }
    bar_chart(path.replace(".json", ".png"), f"Exported INT4 {args.size} vs dense Pro shape", panels, "tokens/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
