"""Test setup: offline (no hub), deterministic, modest threads on the 2-core machine."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_mmengine_loggers():
    """mmengine keeps one MMLogger per name for the whole process, its handlers bound to the
    stderr of the test that made it; after that test's capture closes, a later test's log calls
    would print "--- Logging error ---" tracebacks. Each test starts without them."""
    import sys

    logging_mod = sys.modules.get("mmengine.logging")
    if logging_mod is not None:
        logging_mod.MMLogger._instance_dict.clear()
    yield
