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


def pytest_configure(config):
    # Marks of transformers' common test mixins, which test_transformers_common.py runs against MobileMoE.
    for mark in (
        "generate", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "all_flash_attn_test",
        "torch_compile_test", "accelerate_tests", "is_pipeline_test", "is_training_test", "bitsandbytes",
    ):  # fmt: skip
        config.addinivalue_line("markers", f"{mark}: mark of transformers' common model tests")
