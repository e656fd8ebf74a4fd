"""Tests that need a real cgroup v2 memory hierarchy: they run in the VM lane.

``make test`` runs them once, inside the guest that ``tests/vm/`` boots
(``tests/vm/lane.py``), where ``OOMWARDEN_IN_VM=1``. The host's own pytest
run does not collect this folder (``norecursedirs`` in pyproject.toml); run
by hand on the host they skip, and in the guest a missing capability fails
(the lane sets ``OOMWARDEN_REQUIRE_KERNEL=1`` there).

Nothing here imports ``tests/conftest.py`` by name: pytest loads every
``conftest.py`` as the module ``conftest``, so that name is ambiguous below
``tests/``. Its plain helper modules are shared (the guest has the whole
project folder): ``kernelenv`` has ``need`` and the warden as a subprocess.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))

from v2env import V2Factory, need, own_v2_cgroup_dir

IN_VM = os.environ.get("OOMWARDEN_IN_VM") == "1"


@pytest.fixture(autouse=True)
def _in_the_vm() -> None:
    if not IN_VM:
        pytest.skip("a cgroup v2 test: it runs in the VM lane (make vmtest, or "
                    "python tests/vm/run.py -- .venv/bin/pytest tests/v2)")


@pytest.fixture
def v2_factory() -> Iterator[V2Factory]:
    parent, why = own_v2_cgroup_dir()
    need(parent is not None, why)
    assert parent is not None
    factory = V2Factory(parent)
    try:
        yield factory
    finally:
        factory.cleanup()

