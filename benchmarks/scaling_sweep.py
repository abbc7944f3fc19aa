"""A small, real scaling sweep: tiny MoE shapes trained for the same tokens, loss against memory and active compute.

Every point is the mean of `modeling_mobilemoe.training.train` runs of `recipes/tiny/pretrain/config_scaling.yaml`
(pretraining on the bundled corpus, same steps, batch and context), one per seed (0 and 1), with the architecture
set by `modeling_mobilemoe.scaling.architecture_fields`: 2 layers, hidden 128, and the FFN cut into E x g units of
width 4d/g, as the planner builds its candidates. The series are the paper's three questions:

- expansion: E in {1 (dense), 2, 4, 8} at g=8 with a shared expert;
- granularity: g in {1, 2, 4, 8} at E=8 without a shared expert (g=1 cannot have one: the shared expert is g/2 of
  the g active units), and g in {2, 4, 8} with one;
- shared expert: the two granularity series side by side (equal compute at each g).

Writes `benchmarks/results/scaling_sweep.json` (each run's held-out loss, INT4 weight memory, parameters, FLOPs per
token, seconds) and `scaling_sweep.png` (loss vs memory and loss vs active compute). Runs one process with one thread
by default so the machine stays usable; the full sweep (10 shapes x 2 seeds) takes about 12 minutes on one core.

    python benchmarks/scaling_sweep.py                       # the committed results
    python benchmarks/scaling_sweep.py --steps 2 --seeds 0 --shapes dense E8-g8-shared --out /tmp/s.json  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from modeling_mobilemoe import MobileMoEConfig
from modeling_mobilemoe.scaling import MoEShape, architecture_fields
from modeling_mobilemoe.training import parse_recipe, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "tiny", "pretrain", "config_scaling.yaml")
RESULTS = os.path.join(ROOT, "benchmarks", "results")

SERIES: dict[str, tuple[MoEShape, ...]] = {
    "expansion (g=8, shared)": tuple(MoEShape(e, 8, e > 1) for e in (1, 2, 4, 8)),
    "granularity (E=8, no shared)": tuple(MoEShape(8, g) for g in (1, 2, 4, 8)),
    "granularity (E=8, shared)": tuple(MoEShape(8, g, True) for g in (2, 4, 8)),
}
SHAPES = {shape.name: shape for series in SERIES.values() for shape in series}


def run_point(shape: MoEShape, args: argparse.Namespace, workdir: str) -> dict:
    """Trains one shape with the sweep recipe once per seed; returns the mean held-out loss, each seed's, and the
    accounting of the trained config."""
    fields = architecture_fields(
        args.layers, args.hidden, shape, head_dim=args.head_dim, num_key_value_heads=args.kv_heads
    )
    runs = []
    for seed in args.seeds:
        output_dir = os.path.join(workdir, f"{shape.name}-seed{seed}")
        overrides = [f"model_config_overrides.{key}={value}" for key, value in fields.items()]
        overrides += [f"output_dir={output_dir}", f"max_steps={args.steps}", f"seed={seed}"]
        runs.append(train(RECIPE, overrides))
    config = MobileMoEConfig.from_pretrained(output_dir)  # exactly the trained model's config
    losses = [run["after"]["heldout_loss"] for run in runs]
    return {
        "shape": shape.name,
        "expansion": shape.expansion,
        "granularity": shape.granularity,
        "shared_expert": shape.shared_expert,
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "heldout_loss": statistics.fmean(losses),
        "heldout_loss_per_seed": losses,
        "heldout_loss_at_init": runs[0]["before"]["heldout_loss"],
        "train_loss": statistics.fmean(run["train_loss"] for run in runs),
        "int4_weight_bytes": config.int4_weight_bytes(),
        "total_parameters": config.num_parameters(),
        "active_parameters": config.num_active_parameters(),
        "flops_per_token": config.flops_per_token(config.max_position_embeddings),
        "steps": runs[0]["steps"],
        "seconds": sum(run["seconds"] for run in runs),
    }


def seed_spread(points: dict[str, dict]) -> float | None:
    """The noise level: the mean over shapes of the spread (max - min) of held-out loss across seeds. The seed also
    draws the held-out split, so this is larger than the noise of a difference between two shapes at one seed."""
    spreads = [max(p["heldout_loss_per_seed"]) - min(p["heldout_loss_per_seed"]) for p in points.values()]
    seeds = len(next(iter(points.values()))["heldout_loss_per_seed"]) if points else 0
    return statistics.fmean(spreads) if seeds > 1 else None


def trends(points: dict[str, dict]) -> dict[str, float]:
    """The paper's findings as differences of mean held-out loss at this scale (negative: the first named is
    better); compare them with `seed_spread`."""
    loss = {name: point["heldout_loss"] for name, point in points.items()}
    pairs = {
        "E8-g8-shared minus dense (equal compute)": ("E8-g8-shared", "dense"),
        "E8-g8-shared minus E4-g8-shared": ("E8-g8-shared", "E4-g8-shared"),
        "E4-g8-shared minus E2-g8-shared": ("E4-g8-shared", "E2-g8-shared"),
        "E8-g8 minus E8-g1 (granularity)": ("E8-g8", "E8-g1"),
        "E8-g8 minus E8-g4": ("E8-g8", "E8-g4"),
        "E8-g8-shared minus E8-g8 (shared expert)": ("E8-g8-shared", "E8-g8"),
        "E8-g4-shared minus E8-g4 (shared expert)": ("E8-g4-shared", "E8-g4"),
    }
    return {label: loss[a] - loss[b] for label, (a, b) in pairs.items() if a in loss and b in loss}


def plot(path: str, points: dict[str, dict], title: str) -> None:
    """Two panels, as the paper's Pareto figures: held-out loss vs INT4 weight memory and vs active FLOPs/token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_of = {
        "INT4 weight memory (MiB)": lambda p: p["int4_weight_bytes"] / 2**20,
        "active compute (MFLOPs / token)": lambda p: p["flops_per_token"] / 1e6,
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, (xlabel, x_of) in zip(axes, axes_of.items()):
        for (series, shapes), marker in zip(SERIES.items(), ("o-", "s--", "^-")):
            run = [points[shape.name] for shape in shapes if shape.name in points]
            if run:
                axis.plot([x_of(p) for p in run], [p["heldout_loss"] for p in run], marker, label=series)
        for name, point in points.items():
            xy = (x_of(point), point["heldout_loss"])
            axis.annotate(name, xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("held-out loss")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="default: all")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (batch 16 x 128 tokens)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed; the mean is plotted")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(RESULTS, "scaling_sweep.json"), help="JSON path; PNG beside it")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    points: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="scaling_sweep_") as workdir:
        for name in args.shapes:
            points[name] = run_point(SHAPES[name], args, workdir)
            print(f"[sweep] {name}: held-out loss {points[name]['heldout_loss']:.4f}", flush=True)
    recipe = parse_recipe(RECIPE)
    tokens = args.steps * recipe.training.per_device_train_batch_size * recipe.data.max_seq_length
    report = {
        "benchmark": "scaling_sweep",
        "recipe": os.path.relpath(RECIPE, ROOT),
        "settings": {**{key: value for key, value in vars(args).items() if key != "out"}, "tokens_per_run": tokens},
        "machine": machine_info(args.threads),
        "results": points,
        "trends": trends(points),
        "seed_spread": seed_spread(points),
        "seconds": time.perf_counter() - start,
    }
    write_json(args.out, report)
    title = f"Tiny MobileMoE shapes ({args.layers} layers, hidden {args.hidden}), {tokens / 1e3:.0f}k tokens each"
    plot(os.path.splitext(args.out)[0] + ".png", points, title)
    for label, value in report["trends"].items():
        print(f"[sweep] {label}: {value:+.4f}")
    print(f"[sweep] {len(points)} runs in {report['seconds']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
