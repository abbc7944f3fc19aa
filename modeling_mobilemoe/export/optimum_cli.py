"""`optimum-cli` with MobileMoE registered: `python -m modeling_mobilemoe.export.optimum_cli export executorch ...`.

optimum-executorch exports any model `AutoModelForCausalLM` can load, but `optimum-cli` has no `--trust_remote_code`
and imports no third-party model packages, so on its own it can't resolve `model_type: mobilemoe`. This entry point
imports the package (which registers MobileMoE with the Auto classes) and hands the command line to optimum's CLI
unchanged. In Python, importing `modeling_mobilemoe` before `optimum.executorch` is enough:

    import modeling_mobilemoe
    from optimum.executorch import ExecuTorchModelForCausalLM
    model = ExecuTorchModelForCausalLM.from_pretrained(folder, recipe="xnnpack", task="text-generation")

Optimum's exporter keeps the model's default experts, which export as transformers' `batched_mm` (one copy of each
selected expert's weights per token; `mobilemoe export` uses the sparse `tiled_mm` instead). optimum-executorch
1.1.0 pins `transformers==5.0.0rc1`; it works on current transformers installed with
`pip install --no-deps optimum-executorch optimum`.
"""

import sys

import modeling_mobilemoe  # noqa: F401  (registers the Auto classes)


def main(argv: list[str] | None = None) -> None:
    try:
        from optimum.commands.optimum_cli import main as optimum_main
    except ImportError as error:
        raise SystemExit(
            f"optimum-cli is not installed ({error}); `pip install --no-deps optimum-executorch optimum`."
        ) from None
    sys.argv = ["optimum-cli", *(sys.argv[1:] if argv is None else argv)]
    optimum_main()


if __name__ == "__main__":
    main()
