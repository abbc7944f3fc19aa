import os
import sys


# Test helpers (the independent reference implementation) are imported as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest-xdist worker per CPU: each runs torch (and the processes it starts) on one thread, so the workers
    # share the cores instead of oversubscribing them (two threads each measured no faster than one worker).
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # a value the user set is kept
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Files that take minutes on one worker, longest first (2-core AMD EPYC without AVX-512: the demo 13-14 min; in an
# earlier run export 622 s with four-layer exports, benchmarks 297, training runs 243, hub 151): xdist hands files out
# in collection order, so starting these first lets the two workers finish together. Its own order (most tests
# first) started the demo 10 minutes in and the suite took 31 minutes.
_LONGEST_FILES = (
    "test_pipeline_and_cli.py", "test_export.py", "test_benchmarks.py", "test_training_runs.py", "test_hub.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(_LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep pytest's order


def pytest_configure(config):
    # Marks of transformers' common test mixins, which test_transformers_common.py runs against MobileMoE.
    for mark in (
        "generate", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "all_flash_attn_test",
        "torch_compile_test", "accelerate_tests", "is_pipeline_test", "is_training_test", "bitsandbytes",
    ):  # fmt: skip
        config.addinivalue_line("markers", f"{mark}: mark of transformers' common model tests")
