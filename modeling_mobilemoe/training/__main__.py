"""`python -m modeling_mobilemoe.training RECIPE.yaml [key=value ...]`, the entry point for `accelerate launch -m`."""

import sys

import torch.distributed as dist

from ..cli import main

if __name__ == "__main__":
    code = main(["train", *sys.argv[1:]])
    if dist.is_available() and dist.is_initialized():
        # Join gloo's threads before exit: left to interpreter teardown, a rank once aborted ("terminate called
        # without an active exception") after its run had finished and saved.
        dist.destroy_process_group()
    sys.exit(code)
