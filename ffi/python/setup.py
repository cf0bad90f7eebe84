"""Ships the shardcast C ABI library inside the package; the Python code loads it with ctypes.

Two ways to get the library:
- `pip install ./ffi/python` (from the repository root) runs `cargo build --release -p
  shardcast-ffi` and copies `libshardcast_ffi.so` next to `shardcast/__init__.py`.
  SHARDCAST_CARGO_PROFILE=dev builds the debug library instead (faster to build, for tests).
- SHARDCAST_FFI_PREBUILT=/path/to/libshardcast_ffi.so copies that library and runs no cargo:
  scripts/build-wheel.sh builds the release library once and makes the wheel from it.

The package has no compiled Python extension, only a shared library that ctypes opens, so the
wheel works with every CPython 3 (tag `py3-none-PLATFORM`), but it is a platform wheel: the
library is x86_64 Linux code. scripts/build-wheel.sh gives it the manylinux tag that
`auditwheel show` finds for the library.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class BuildWithCargo(build_py):
    def run(self):
        dest = HERE / "shardcast" / "libshardcast_ffi.so"
        prebuilt = os.environ.get("SHARDCAST_FFI_PREBUILT")
        if prebuilt:
            shutil.copy2(prebuilt, dest)
        else:
            profile = os.environ.get("SHARDCAST_CARGO_PROFILE", "release")
            cargo = os.environ.get("CARGO", "cargo")
            cmd = [cargo, "build", "-p", "shardcast-ffi", "--lib"]
            if profile == "release":
                cmd.append("--release")
            subprocess.run(cmd, cwd=REPO, check=True)
            target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
            lib = target / ("release" if profile == "release" else "debug") / "libshardcast_ffi.so"
            shutil.copy2(lib, dest)
        super().run()


class NativeDistribution(Distribution):
    """Carries a native library: the wheel is a platform wheel, installed into platlib."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """A wheel for this platform that any Python 3 can use (the library is not an extension)."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(distclass=NativeDistribution, cmdclass={"build_py": BuildWithCargo, "bdist_wheel": PlatformWheel})
