from __future__ import annotations

from collections.abc import Iterator

import pytest

from tokenrelay.testing import LifecycleCapture, capture_lifecycle


@pytest.fixture
def lifecycle() -> Iterator[LifecycleCapture]:
    """The relay's lifecycle lines logged during the test, with their trio times."""
    with capture_lifecycle() as records:
        yield records
