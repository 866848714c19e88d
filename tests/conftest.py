import os

import pytest

# Nothing in the suite may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite runs in fp32 on every machine, whatever its bf16 support (engines and the servers
# it starts read $QAA_DTYPE when no dtype is named); bf16 tests name their dtype.
os.environ.setdefault("QAA_DTYPE", "float32")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tests.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def default_dir():
    """The default model's converted checkpoint (converted once per cache dir)."""
    from engine.weights import default_model_dir

    return default_model_dir()
