"""OpenMP's wait policy, which `import mmcompose` sets before torch loads its OpenMP runtime (read once, then)."""

from __future__ import annotations

import os
import subprocess
import sys

POLICY_AT_TORCH_IMPORT = """
import builtins, os
real_import, seen = builtins.__import__, []
def watching(name, *args, **kwargs):
    if name == "torch" and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY", "unset"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = watching
import mmcompose
print(seen[0])
"""


def policy_at_torch_import(environment: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", POLICY_AT_TORCH_IMPORT], env=environment, capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def test_threads_sleep_at_barriers_unless_the_user_says_otherwise() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert policy_at_torch_import(environment) == "PASSIVE"
    assert policy_at_torch_import({**environment, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
