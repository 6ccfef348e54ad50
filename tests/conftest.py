import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def twx_env():
    """One TextWorldExpress engine (a JVM) shared by the session's tests."""
    from dreamgym_core.envs import EnvSpec, make_env

    env = make_env(EnvSpec(env="twx", game="twc"))
    yield env
    env.close()
