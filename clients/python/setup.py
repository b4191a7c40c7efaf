"""Build hook for the SDK: generates taskbroker/v1 from the .proto files into the wheel.

Generated code is not committed (STYLE.md 2.5), so an installed SDK must carry code that its own
build made. `build_py` runs grpcio-tools (a pinned build requirement) on the protos, found in the
repository at ../../proto or, when building from an sdist, in the proto/ copy that `sdist` puts
into the archive. Editable installs skip generation: the development tree uses `make proto`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_PACKAGE = Path("taskbroker") / "v1"
# The copy an sdist carries, then the repository's (pip install ./clients/python, or
# git+...#subdirectory=clients/python, which builds inside a clone).
PROTO_ROOTS = (HERE / "proto", HERE.parent.parent / "proto")


def _proto_root() -> Path:
    for root in PROTO_ROOTS:
        if any((root / PROTO_PACKAGE).glob("*.proto")):
            return root
    searched = ", ".join(str(root / PROTO_PACKAGE) for root in PROTO_ROOTS)
    raise SystemExit(f"taskbroker: no .proto files found (searched {searched})")


def _plugin(name: str) -> str:
    """The path of a protoc plugin installed as a build requirement's console script."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"taskbroker: the protoc plugin {name} is missing (mypy-protobuf)")
    return found


def generate(proto_root: Path, out_dir: Path) -> None:
    """Generate the taskbroker.v1 modules and their type stubs under out_dir."""
    target = out_dir / PROTO_PACKAGE
    shutil.rmtree(target, ignore_errors=True)  # removed protos must leave no stale modules
    target.mkdir(parents=True)
    protos = sorted(
        str(p.relative_to(proto_root)) for p in (proto_root / PROTO_PACKAGE).glob("*.proto")
    )
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out=async_only:{out_dir}",
        *protos,
    ]
    subprocess.run(command, check=True, cwd=proto_root)
    (target / "__init__.py").write_text(
        '"""Generated from proto/taskbroker/v1 when the SDK was built: do not edit."""\n'
    )


class BuildPyWithProtos(build_py):
    """build_py that also writes the generated taskbroker.v1 package into the build."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            generate(_proto_root(), Path(self.build_lib).resolve())


class SdistWithProtos(sdist):
    """sdist that carries the protos, so a wheel can be built from the archive alone."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = _proto_root()
        destination = Path(base_dir) / "proto" / PROTO_PACKAGE
        destination.mkdir(parents=True, exist_ok=True)
        for proto in sorted((root / PROTO_PACKAGE).glob("*.proto")):
            shutil.copy2(proto, destination / proto.name)


setup(cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
