"""Every built-in policy runs through `oomwarden explain` on the live machine
(rules files and .py policies: tests/test_examples.py)."""

from __future__ import annotations

import json

import pytest

from oomwarden.cli import main
from oomwarden.policy.registry import builtins

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("name", sorted(builtins()))
def test_builtin_explains_the_live_machine(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--policy", name, "--json", "--window", "0.3", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == name and out["fallback"] is None
    assert out["victim"] is not None and out["victim"]["verdict"] == "select"
    assert out["victim"]["reasons"], out["victim"]
    assert out["actions"] and out["actions"][0]["action"] in ("kill_process", "kill_cgroup")
    if name != "kernel":
        assert out["policy_ms"] is not None
