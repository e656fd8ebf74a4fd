"""Shared fixtures: real-kernel capability gates and child memory cgroups.

Real-kernel tests skip where a capability is missing, except under
``OOMWARDEN_REQUIRE_KERNEL=1`` (set by ``.ci/run``), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kernelenv import ChildMemcg, MemcgFactory, TwinFactory, need, own_v1_memcg_dir

__all__ = ["need"]  # ``from conftest import need`` in the tests


@pytest.fixture
def memcg_factory() -> Iterator[MemcgFactory]:
    """Makes child v1 memory cgroups under this process's own memcg (limit <= 1 GiB)
    and removes them afterwards, killing what the test started in them."""
    parent, why = own_v1_memcg_dir()
    need(parent is not None, why)
    assert parent is not None
    factory = MemcgFactory(parent)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def twin_factory(memcg_factory: MemcgFactory) -> Iterator[TwinFactory]:
    """Twins of child memcgs in the cgroup2 or freezer hierarchy. Torn down
    before memcg_factory: its cleanup (which stops the processes started in
    the memcgs) runs here first, so that the emptied twins can be removed."""
    factory = TwinFactory()
    try:
        yield factory
    finally:
        try:
            memcg_factory.cleanup()
        finally:
            factory.cleanup()


@pytest.fixture
def child_memcg(memcg_factory: MemcgFactory) -> ChildMemcg:
    return memcg_factory.create(limit_bytes=512 * 1024 * 1024)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for control sockets (``sun_path`` holds 107 bytes),
    0755 so that a test's ``nobody`` client can reach them; removed afterwards
    with whatever is left in it."""
    d = tempfile.mkdtemp(prefix="ow-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
