import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture
def compose():
    """Compose conf/ with overrides through Hydra's compose API, as the app does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from compllm.config.schema import register

    register()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One model cache for the session: the GGUF -> bf16 conversion is paid once."""
    return os.environ.get("COMPLLM_CACHE") or str(tmp_path_factory.mktemp("cache"))
