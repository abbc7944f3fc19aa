"""The `mobilemoe` command line."""

from __future__ import annotations

import argparse
import sys

from .tokenizer_training import add_tokenizer_subcommand


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.out, seed=args.seed, recipes_dir=args.recipes)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .training import train

    train(args.recipe, args.overrides)
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from .configuration_mobilemoe import PRESETS, MobileMoEConfig

    if args.config:
        configs = {args.config: MobileMoEConfig.from_pretrained(args.config)}
    else:
        configs = {name: MobileMoEConfig.from_preset(name) for name in ([args.preset] if args.preset else PRESETS)}
    print(
        f"{'model':<10} {'layers':>6} {'hidden':>6} {'experts':>9} {'active':>10} {'total':>10} {'GFLOP/tok@1k':>12} {'INT4 GiB':>9}"
    )
    for name, config in configs.items():
        print(
            f"{name:<10} {config.num_hidden_layers:>6} {config.hidden_size:>6} "
            f"{config.num_experts_per_tok:>4}/{config.num_local_experts:<4} "
            f"{config.num_active_parameters() / 1e6:>9.1f}M {config.num_parameters() / 1e6:>9.1f}M "
            f"{config.flops_per_token(1024) / 1e9:>12.3f} {config.int4_weight_bytes() / 2**30:>9.3f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilemoe", description="MobileMoE for Hugging Face Transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True)

    demo = subparsers.add_parser(
        "demo",
        help="the whole pipeline (tokenizer, pretrain, mid-train, SFT, chat) on the tiny preset and bundled data",
    )
    demo.add_argument("--out", default="outputs/demo", help="folder for everything the demo writes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--recipes", default=None, help="folder of the stage recipes (default: the repository's recipes/tiny)"
    )
    demo.set_defaults(func=_run_demo)

    train = subparsers.add_parser(
        "train",
        help="one training stage from a YAML recipe (also: accelerate launch -m modeling_mobilemoe.training)",
    )
    train.add_argument("recipe", help="a recipe, e.g. recipes/tiny/pretrain/config.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe values to change (YAML values)")
    train.set_defaults(func=_run_train)

    info = subparsers.add_parser("info", help="parameter, FLOP and INT4 memory accounting of presets or a config")
    info.add_argument("--preset", choices=["S", "M", "L", "tiny"], help="one preset (default: all)")
    info.add_argument("--config", help="a model folder or config.json to account for instead")
    info.set_defaults(func=_run_info)

    add_tokenizer_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"{args.command}: {error}")  # exits with status 2


if __name__ == "__main__":
    sys.exit(main())
