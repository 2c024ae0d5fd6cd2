"""The GPU lane: every test in tests/cuda is marked `cuda` and runs on a CUDA device; without
one it is skipped, with the reason, before any work is done.

``LIGHTNETS_TEST_DEVICE=cpu`` runs the same tests on the CPU (their logic, on a machine without
a GPU; what is inherently CUDA is skipped there); ``LIGHTNETS_TEST_DEVICE=cuda:1`` picks another
GPU. Collecting these tests neither initializes CUDA nor builds anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cuda.support import lane_device

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:  # every test of this folder, whatever its module says
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="session", autouse=True)
def device() -> torch.device:
    """The device under test (cuda, or cpu with LIGHTNETS_TEST_DEVICE=cpu). Session-scoped and
    autouse, so a test is skipped before any fixture of a narrower scope builds anything."""
    try:
        dev, reason = lane_device()
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None
    if reason is not None:
        pytest.skip(reason)
    return dev
