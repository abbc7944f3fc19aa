"""`python -m modeling_mobilemoe.training RECIPE.yaml [key=value ...]`, the entry point for `accelerate launch -m`."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
