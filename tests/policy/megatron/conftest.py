"""Megatron tests that build policies in the pytest process leave megatron's groups and the
process group they made behind; each module releases them, so that later tests see a
process without torch.distributed, as a plain run has."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="module", autouse=True)
def _release_process_groups():
    yield
    if importlib.util.find_spec("megatron.core") is not None:
        from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel

        destroy_model_parallel()
