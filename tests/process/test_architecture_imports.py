"""The layers hold at run time too, transitively: in a fresh interpreter, importing the engine loads no
swarm module but the swarm's config section (through the config root) and no hivemind; importing a swarm
peer loads neither the engine nor the launcher (a peer runs without ``launcher/``); the core loads nothing
of either executor."""

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("checkfree", "launcher", "hivemind"))))
"""


def _loaded(module: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module,forbidden,allowed",
    [
        (
            "checkfree.core.rebuild",
            ("checkfree.engine", "checkfree.swarm", "launcher", "hivemind", "checkfree.config"),
            (),
        ),
        (
            "checkfree.engine.trainer",
            ("checkfree.swarm", "launcher", "hivemind"),
            ("checkfree.swarm", "checkfree.swarm.config"),
        ),
        ("checkfree.swarm.peer", ("checkfree.engine", "launcher"), ()),
    ],
)
def test_importing_a_layer_loads_only_what_it_may(module, forbidden, allowed):
    loaded = _loaded(module)
    bad = [m for m in loaded if m not in allowed and any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, f"importing {module} loads {bad}"
    assert module in loaded
