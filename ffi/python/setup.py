"""Builds the shardcast C ABI library with cargo and ships it inside the package.

`pip install ./ffi/python` (from the repository root) runs `cargo build --release -p
shardcast-ffi` and copies `libshardcast_ffi.so` next to `shardcast/__init__.py`; the Python code
loads it with ctypes, so the package has no compiled Python extension. SHARDCAST_CARGO_PROFILE=dev
builds the debug library instead (faster to build, for tests).
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class BuildWithCargo(build_py):
    def run(self):
        profile = os.environ.get("SHARDCAST_CARGO_PROFILE", "release")
        cargo = os.environ.get("CARGO", "cargo")
        cmd = [cargo, "build", "-p", "shardcast-ffi", "--lib"]
        if profile == "release":
            cmd.append("--release")
        subprocess.run(cmd, cwd=REPO, check=True)
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
        lib = target / ("release" if profile == "release" else "debug") / "libshardcast_ffi.so"
        shutil.copy2(lib, HERE / "shardcast" / "libshardcast_ffi.so")
        super().run()


setup(cmdclass={"build_py": BuildWithCargo})
