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
    import torch.distributed as dist

    from .training import train

    try:
        train(args.recipe, args.overrides)
    finally:
        if dist.is_available() and dist.is_initialized():
            # Join gloo's threads before exit: left to interpreter teardown, a rank of `accelerate launch` once
            # aborted ("terminate called without an active exception") after its run had finished and saved.
            dist.destroy_process_group()
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


def _parse_count(text: str) -> float:
    """`300M`, `1.2B`, `5e8`: a parameter count."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:].upper(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 300M, 1.2B or 5e8") from None


def _run_plan(args: argparse.Namespace) -> int:
    import json

    from .scaling import GB, plan

    candidates = plan(
        args.memory_gb,
        int4=args.int4,
        max_active_parameters=args.active_params,
        context_length=args.context,
        vocab_size=args.vocab,
        top=args.top,
    )
    weights = "INT4" if args.int4 else "bf16"
    print(
        f"budget {args.memory_gb} GB ({weights} weights + bf16 KV cache at {args.context} tokens)"
        + (f", <= {args.active_params / 1e6:.0f}M active parameters" if args.active_params else "")
    )
    print(
        f"{'#':>2} {'shape':<15} {'layers':>6} {'hidden':>6} {'experts':>8} {'active':>8} {'total':>8} "
        f"{'weights':>8} {'KV':>6} {'GFLOP/tok':>9} {'pred. loss':>10}"
    )
    for rank, candidate in enumerate(candidates, 1):
        config = candidate.config
        experts = f"{candidate.shape.top_k}/{candidate.shape.num_experts}" if not candidate.shape.is_dense else "-"
        print(
            f"{rank:>2} {candidate.shape.name:<15} {config.num_hidden_layers:>6} {config.hidden_size:>6} {experts:>8} "
            f"{candidate.active_parameters / 1e6:>7.0f}M {candidate.total_parameters / 1e6:>7.0f}M "
            f"{candidate.weight_bytes / GB:>7.3f}G {candidate.kv_cache_bytes / GB:>5.3f}G "
            f"{candidate.flops_per_token / 1e9:>9.3f} {candidate.loss:>10.4f}"
        )
    for rank, candidate in enumerate(candidates[: args.configs], 1):
        print(f"\n# {rank}: {candidate.shape.name}, MobileMoEConfig JSON (MobileMoEConfig(**json) or config.json)")
        print(json.dumps(candidate.config_dict(), indent=2, sort_keys=True))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_model, greedy_with_pytorch, load_runner, reference_model

    options = {"quantize": args.quantize, "max_seq_len": args.max_seq_len}
    for name in ("max_batch", "experts", "max_chunk"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.sdpa is not None:
        options["custom_sdpa"] = args.sdpa == "custom"
    path = export_model(args.model, args.out, format=args.format, target=args.target, **options)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.check_tokens:
        import torch

        runner = load_runner(args.out)
        reference = reference_model(args.model, args.quantize, runner.export_config.experts)
        prompt = torch.arange(8)[None] % reference.config.vocab_size
        exported = runner.generate(prompt, args.check_tokens)
        expected = greedy_with_pytorch(reference, prompt, args.check_tokens)
        same = int((exported.sequences == expected.sequences).all(dim=0).sum()) - prompt.shape[1]
        print(
            f"check: {same}/{args.check_tokens} greedy tokens as PyTorch, max |logit diff| "
            f"{(exported.logits - expected.logits).abs().max():.2e}"
        )
    return 0


def _card_options(args: argparse.Namespace) -> dict:
    return {
        "results": args.results,
        "size": args.size,
        "variant": args.variant,
        "base_model": args.base_model,
        "datasets": args.dataset,
        "license": args.license,
        "templates_dir": args.templates,
    }


def _run_card(args: argparse.Namespace) -> int:
    from .hub import render_card, validate_card

    card = render_card(args.model, repo_id=args.repo_id, **_card_options(args))
    validate_card(card)
    card.save(args.out)
    evaluated = len(card.data.eval_results or [])
    print(f"wrote {args.out} ({card.data.model_name}; {evaluated} measured results in its model-index)")
    return 0


def _run_publish(args: argparse.Namespace) -> int:
    from .hub import publish

    options = {name: getattr(args, name) for name in ("private", "dry_run", "commit_message", "export", "export_quantize")}
    published = publish(args.model, args.repo_id, **options, **_card_options(args))
    if published.folder is not None:
        files = sorted(str(path.relative_to(published.folder)) for path in published.folder.rglob("*") if path.is_file())
        print(f"dry run: wrote {published.folder} ({len(files)} files: {', '.join(files)}); nothing uploaded")
    else:
        print(f"uploaded to {args.repo_id}: {published.commit.commit_url}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from .hub import evaluate
    from .hub.evaluation import summary_lines

    options = ("num_fewshot", "limit", "batch_size", "device", "dtype", "apply_chat_template", "trust_remote_code")
    results = evaluate(args.model, args.tasks, output=args.out, **{name: getattr(args, name) for name in options})
    for line in summary_lines(results):
        print(line)
    if args.out:
        print(f"wrote {args.out} (mobilemoe card --model {args.model} --results {args.out})")
    return 0


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", help="lm-eval results JSON (mobilemoe eval --out) for the evaluation table")
    parser.add_argument(
        "--size", help="template size: S, M, L or custom (default: S/M/L when the config has that shape, else custom)"
    )
    parser.add_argument(
        "--variant", help="Base, SFT or QAT (default: QAT when quantized, else the stage in stage_summary.json)"
    )
    parser.add_argument("--base-model", help="Hub id of the model this one was trained from (card metadata)")
    parser.add_argument("--dataset", action="append", help="Hub id of a training dataset (repeat; card metadata)")
    parser.add_argument(
        "--license", default=None,
        help="license id of the weights (card metadata; default: other for S/M/L, Meta's terms; apache-2.0 otherwise)",
    )  # fmt: skip
    parser.add_argument("--templates", default=None, help="folder of card templates (default: the repository's hub_cards/)")


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

    plan = subparsers.add_parser(
        "plan",
        help="the best MoE shapes (E, g, shared expert, top-k, depth, width) for a memory / compute budget",
        description="Enumerates MobileMoE shapes that fit the budget and ranks them by the loss model of "
        "modeling_mobilemoe.scaling (Chinchilla form with MoE terms calibrated to the paper's findings).",
    )
    plan.add_argument("--memory-gb", type=float, required=True, help="weights + KV cache budget, GB = 2^30 bytes")
    plan.add_argument("--int4", action="store_true", help="count weights in the packed INT4 format (default: bf16)")
    plan.add_argument("--active-params", type=_parse_count, help="most active parameters per token, e.g. 300M")
    plan.add_argument(
        "--context", type=int, default=8192, help="tokens of bf16 KV cache counted in the budget (0: weights only)"
    )
    plan.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default: the Llama-3 tokenizer)")
    plan.add_argument("--top", type=int, default=5, help="shapes to list")
    plan.add_argument("--configs", type=int, default=3, help="of those, how many to print as config JSON")
    plan.set_defaults(func=_run_plan)

    export = subparsers.add_parser("export", help="export a model folder to ExecuTorch (.pte) or ONNX")
    export.add_argument("--format", required=True, choices=["executorch", "onnx"])
    export.add_argument("--model", required=True, help="a model folder (bf16, packed INT4 or QAT checkpoints)")
    export.add_argument("--out", required=True, help="folder for the program, its tokenizer and configs")
    export.add_argument(
        "--quantize", default="none", choices=["none", "8da4w"],
        help="8da4w: INT4 group-32 weights (the published format's), INT8 dynamic activations where the runtime has them",
    )  # fmt: skip
    export.add_argument("--max-seq-len", type=int, default=None, help="positions the export holds (default: the model's)")
    export.add_argument("--max-batch", type=int, default=None, help="largest batch (ExecuTorch: 1; ONNX default: 8)")
    export.add_argument(
        "--max-chunk", type=int, default=None,
        help="ExecuTorch: most tokens one call takes (default 128); longer prompts are prefilled in chunks",
    )  # fmt: skip
    export.add_argument(
        "--sdpa", default=None, choices=["custom", "stock"],
        help="ExecuTorch attention: its custom_sdpa over the filled cache positions (default) or transformers' SDPA",
    )  # fmt: skip
    export.add_argument(
        "--target", default=None,
        help="ExecuTorch: xnnpack (default, runs on any CPU) or arm (fused llama::quantized_moe_ffn); ONNX: cpu",
    )  # fmt: skip
    export.add_argument(
        "--experts", default=None, choices=["qmoe", "packed"],
        help="ONNX INT4 experts: qmoe (ONNX Runtime's fused MoE op, default) or packed (the checkpoint's bytes as they are)",
    )  # fmt: skip
    export.add_argument(
        "--check-tokens", type=int, default=0, metavar="N",
        help="then run the export greedily for N tokens against PyTorch and print the agreement",
    )  # fmt: skip
    export.set_defaults(func=_run_export)

    card = subparsers.add_parser("card", help="render the model card (README.md) of a model folder from hub_cards/")
    card.add_argument("--model", required=True, help="a model folder")
    card.add_argument("--out", required=True, help="where to write the card (e.g. DIR/README.md)")
    card.add_argument("--repo-id", default=None, help="the Hub repository the card's snippets load (namespace/name)")
    _add_card_arguments(card)
    card.set_defaults(func=_run_card)

    publish = subparsers.add_parser(
        "publish", help="assemble a Hub-ready folder (weights, remote code, tokenizer, card) and upload it"
    )
    publish.add_argument("--model", required=True, help="a model folder")
    publish.add_argument("--repo-id", required=True, help="the Hub repository to create or update (namespace/name)")
    publish.add_argument("--private", action="store_true", help="create the repository private")
    publish.add_argument("--dry-run", metavar="DIR", default=None, help="write the folder to DIR and upload nothing")
    publish.add_argument("--export", nargs="*", default=[], choices=["onnx", "executorch"], help="exports to add")
    publish.add_argument(
        "--export-quantize", default=None, choices=["none", "8da4w"],
        help="quantization of the exports (default: 8da4w for a packed INT4 model, none otherwise)",
    )  # fmt: skip
    publish.add_argument("--commit-message", default="Upload MobileMoE model")
    _add_card_arguments(publish)
    publish.set_defaults(func=_run_publish)

    evaluate = subparsers.add_parser(
        "eval", help="evaluate a model with lm-evaluation-harness (offline: the shipped mobilemoe_toy_facts task)"
    )
    evaluate.add_argument("--model", required=True, help="a model folder or Hub id")
    evaluate.add_argument(
        "--tasks", nargs="+", default=["mobilemoe_toy_facts"],
        help="lm-eval tasks or groups: mobilemoe_toy_facts (offline), mobilemoe_paper_base (the paper's base "
        "benchmarks, downloaded), or any lm-eval task",
    )  # fmt: skip
    evaluate.add_argument("--out", default=None, help="write lm-eval's results JSON here (the input of `card`)")
    evaluate.add_argument("--num-fewshot", type=int, default=None)
    evaluate.add_argument(
        "--limit", type=lambda text: float(text) if float(text) < 1 else int(text), default=None,
        help="examples per task (a fraction of them if < 1)",
    )  # fmt: skip
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    evaluate.add_argument("--apply-chat-template", action="store_true", help="prompt chat models through their template")
    evaluate.add_argument("--trust-remote-code", action="store_true", help="load without this package's classes")
    evaluate.set_defaults(func=_run_eval)

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
