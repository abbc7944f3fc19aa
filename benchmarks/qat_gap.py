"""Float vs PTQ-INT4 vs QAT-INT4 held-out loss on the demo's tiny model, with the same extra training for float and QAT.

    mobilemoe demo                                          # makes outputs/demo/sft
    python benchmarks/qat_gap.py --model outputs/demo/sft --json benchmarks/results/qat_gap_tiny_seed0.json \
        max_steps=100 save_steps=100 seed=0                 # the README's table: seeds 0, 1, 2

The QAT stage trains the checkpoint further, so its loss alone mixes two effects; this script runs the same recipe
(`recipes/tiny/qat`) twice from the same checkpoint: once unquantized (a float fine-tune) and once as QAT, and reports
- float: the checkpoint, and after the float fine-tune;
- PTQ-INT4: the checkpoint, and the float fine-tuned model, quantized without training (INT4 weights, INT8
  activations; `convert_to_int4` of a fake-quantized model is exact, so this is the saved INT4 model's loss);
- QAT-INT4: after quantization-aware training (the saved INT4 model);
and the INT4 weight bytes the accounting helper predicts against the size of the saved safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from modeling_mobilemoe.training import parse_recipe, run_stage
from modeling_mobilemoe.training.runner import build_datasets, build_model, build_tokenizer, build_trainer


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ptq_heldout_loss(recipe_path: str, overrides: list[str]) -> float:
    """Held-out loss of a checkpoint quantized without training, on the recipe's held-out split."""
    recipe = parse_recipe(recipe_path, overrides)
    tokenizer = build_tokenizer(recipe)
    train, heldout = build_datasets(recipe, tokenizer)
    return build_trainer(recipe, build_model(recipe, tokenizer), tokenizer, train, heldout).evaluate()["eval_loss"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/demo/sft", help="the SFT checkpoint to quantize")
    parser.add_argument("--recipe", default=os.path.join(REPOSITORY, "recipes", "tiny", "qat", "config.yaml"))
    parser.add_argument("--out", default="outputs/qat_gap")
    parser.add_argument("--json", default=os.path.join(REPOSITORY, "benchmarks", "results", "qat_gap_tiny_seed0.json"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args(argv)

    common = [f"model_name_or_path={args.model}", *args.overrides]
    qat = run_stage(parse_recipe(args.recipe, [*common, f"output_dir={os.path.join(args.out, 'qat')}"]))
    float_tuned = run_stage(
        parse_recipe(
            args.recipe,
            [*common, "stage=sft", "quantization_config=null", f"output_dir={os.path.join(args.out, 'float')}"],
        )
    )
    ptq_of_fine_tuned = ptq_heldout_loss(args.recipe, [*args.overrides, f"model_name_or_path={float_tuned['output_dir']}"])
    results = {
        "model": args.model,
        "recipe": os.path.relpath(args.recipe, REPOSITORY),
        "overrides": args.overrides,
        "steps": qat["steps"],
        "heldout_loss": {
            "float_checkpoint": qat["before"]["float_heldout_loss"],
            "ptq_int4": qat["before"]["heldout_loss"],
            "float_fine_tuned": float_tuned["after"]["heldout_loss"],
            "ptq_int4_of_fine_tuned": ptq_of_fine_tuned,
            "qat_int4": qat["after"]["heldout_loss"],
        },
        "int4_weight_bytes_predicted": qat["after"]["int4_weight_bytes_predicted"],
        "saved_weights_bytes": qat["after"]["saved_weights_bytes"],
    }
    losses = results["heldout_loss"]
    results["ptq_gap"] = losses["ptq_int4_of_fine_tuned"] - losses["float_fine_tuned"]
    results["qat_gap"] = losses["qat_int4"] - losses["float_fine_tuned"]
    results["share_of_ptq_gap_closed"] = 1 - results["qat_gap"] / results["ptq_gap"]
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
