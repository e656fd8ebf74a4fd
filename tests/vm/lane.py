"""The VM lane of ``make test``: the cgroup v2 tests (``tests/v2``) in the guest.

usage: python tests/vm/lane.py

Builds the guest if need be (``builder.py``), installs qemu if it is missing,
boots once and runs ``.venv/bin/python -m pytest -q tests/v2`` inside, with
``OOMWARDEN_IN_VM=1`` and ``OOMWARDEN_REQUIRE_KERNEL=1`` (a skip in the guest
would mean a broken lane, so there it fails).

Gating on the host: when the guest cannot be had (no apt to fetch the kernel
or qemu, a download that fails), the lane prints one line and passes, except
under ``OOMWARDEN_REQUIRE_KERNEL=1`` (CI), where it fails. A guest that does
not boot, a lost exit status, a timeout or a failing test fail everywhere.
"""

from __future__ import annotations

import os
import sys
import time

from builder import PROJECT, BuildError, build, cache_dir, ensure_qemu, log
from run import DEFAULT_TIMEOUT_S, NO_STATUS, boot, report_failure, timings

REQUIRE = os.environ.get("OOMWARDEN_REQUIRE_KERNEL") == "1"


def main() -> int:
    started = time.monotonic()
    timeout = float(os.environ.get("OOMWARDEN_VM_TIMEOUT", DEFAULT_TIMEOUT_S))
    python = PROJECT / ".venv" / "bin" / "python"
    try:
        if sys.platform != "linux" or os.uname().machine != "x86_64":
            raise BuildError(f"the VM lane runs on x86_64 Linux, not {sys.platform} "
                             f"{os.uname().machine}")
        guest = build(cache_dir())
        qemu = ensure_qemu()
    except BuildError as e:
        if REQUIRE:
            print(f"vm lane: error: OOMWARDEN_REQUIRE_KERNEL=1 but no guest: {e}",
                  file=sys.stderr)
            return 1
        print(f"vm lane: skipped, the cgroup v2 tests did not run: {e}", file=sys.stderr)
        return 0
    built = time.monotonic()
    log(f"cgroup v2 tests in a {guest.kernel_version} guest ({guest.kernel_format})")
    outcome = boot(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/v2"],
        guest=guest, qemu=qemu, cwd=PROJECT, timeout_s=timeout,
        env={"OOMWARDEN_REQUIRE_KERNEL": "1"},
    )
    if outcome.status is None:
        report_failure(outcome)
        return NO_STATUS
    log(f"lane {'passed' if outcome.status == 0 else 'FAILED'}: guest build/check "
        f"{built - started:.1f} s, {timings(outcome)}")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
