"""The example configs in configs/ stay loadable."""
from pathlib import Path

import pytest

from server.config import build_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads(path):
    config = build_config(str(path))
    assert config.engine.block_size > 0


def test_configs_exist():
    assert len(CONFIGS) >= 2
