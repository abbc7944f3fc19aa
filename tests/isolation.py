"""Running code the way a Hub user without this package would: a fresh interpreter where `modeling_mobilemoe`
cannot be imported, offline, with its own remote-code module cache."""

import subprocess
import sys


BLOCK_PACKAGE = 'import sys\nsys.modules["modeling_mobilemoe"] = None  # `import modeling_mobilemoe` now fails\n'


def run_without_package(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """Runs `script` with `args` in a subprocess; fails the calling test with stderr when it exits non-zero."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + script, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules"), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
