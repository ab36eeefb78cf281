from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ISEARCH_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    os.environ.setdefault("ISEARCH_DATA", str(DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the real benchmark data is missing: {DATA} (tests read ../shared/data)")
    return DATA


@pytest.fixture(scope="session")
def ukbench(data_dir) -> Path:
    return data_dir / "ukbench1000"


@pytest.fixture(scope="session")
def paris(data_dir) -> Path:
    return data_dir / "rparis250" / "jpg"
