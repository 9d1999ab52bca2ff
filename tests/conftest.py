"""Shared fixtures: a fresh registry, tiny base models, real PEFT adapters, the `ah` CLI.

The environment is made hermetic once per session: a fixed author, no inherited
`$AH_REGISTRY`, a private `$AH_HOME`, and Hugging Face libraries forced offline (tests
never download). Helpers live in tests/adapters.py; `run_ah` is re-exported here so a test
can write `from conftest import run_ah` or use the `ah` fixture.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import adapters
from adapters import run_ah, sha256_tree  # noqa: F401  (re-exported for other test modules)

from adapterhub.registry import Registry

TEST_AUTHOR = "Test Author <test@example.com>"

_AH_HOME: str | None = None


def pytest_configure(config):
    global _AH_HOME
    os.environ["AH_AUTHOR"] = TEST_AUTHOR
    os.environ.pop("AH_REGISTRY", None)
    os.environ.pop("AH_COMMIT_TIME", None)
    _AH_HOME = tempfile.mkdtemp(prefix="ah-home-")
    os.environ["AH_HOME"] = _AH_HOME
    # Never reach the network, and keep library chatter out of test output.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for line in (
        "ignore::UserWarning:peft.*",
        "ignore::FutureWarning:peft.*",
        "ignore::UserWarning:transformers.*",
        "ignore::FutureWarning:transformers.*",
        "ignore::DeprecationWarning:transformers.*",
        "ignore:.*fan_in_fan_out.*:UserWarning",
        "ignore:.*tied.*:UserWarning",
        "ignore:`past_key_values` is deprecated:FutureWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


def pytest_unconfigure(config):
    if _AH_HOME:
        shutil.rmtree(_AH_HOME, ignore_errors=True)


# --- registry and CLI ---------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path) -> Registry:
    """An empty registry in a fresh folder (`tmp_path / "reg"`)."""
    return Registry.init(tmp_path / "reg")


@pytest.fixture
def ah(tmp_path):
    """`run_ah` with the working directory defaulting to the test's tmp_path.

    Call as `ah("log", "--format", "json", cwd=..., env={...})`; returns (rc, stdout, stderr).
    """

    def call(*args, cwd=None, env=None, **kwargs):
        return run_ah(*args, cwd=tmp_path if cwd is None else cwd, env=env, **kwargs)

    return call


# --- tiny base models and real adapters ------------------------------------------------------


@pytest.fixture(scope="session")
def base_model():
    """`base_model(family)` -> a cached tiny base model ("llama" or "gpt2").

    The cached model is shared by the whole session: never modify it. The helpers in
    tests/adapters.py deep-copy it before wrapping it in an adapter.
    """
    pytest.importorskip("peft")
    return functools.lru_cache(maxsize=None)(adapters.build_base)


@pytest.fixture(scope="session")
def llama_base(base_model):
    return base_model("llama")


@pytest.fixture(scope="session")
def gpt2_base(base_model):
    return base_model("gpt2")


@pytest.fixture(scope="session")
def _adapter_cache(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("adapters")

    @functools.lru_cache(maxsize=None)
    def build(family: str, kind: str, dtype: str, seed: int) -> Path:
        out = root / f"{family}-{kind}-{dtype}-{seed}"
        return adapters.make_adapter(base_model(family), family, kind, out, dtype=dtype, seed=seed)

    return build


@pytest.fixture
def adapter_factory(_adapter_cache, tmp_path):
    """`adapter_factory(family, kind, dtype="fp32", seed=0)` -> a fresh adapter folder.

    Each adapter is built once per session; every call returns a private copy under this
    test's tmp_path, which the test may change freely.
    """
    counter = iter(range(1_000_000))

    def make(family: str, kind: str, dtype: str = "fp32", seed: int = 0) -> Path:
        src = _adapter_cache(family, kind, dtype, seed)
        dst = tmp_path / "adapters" / f"{src.name}-{next(counter)}"
        shutil.copytree(src, dst)
        return dst

    return make
