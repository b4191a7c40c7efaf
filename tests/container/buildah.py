"""Buildah without a Docker engine, for the container tests (`make test-container`).

Three things: a local Debian base image made by debootstrap (no registry is needed) and cached
under a hash of what it is made from; image builds with `buildah bud`; and containers run the way
`docker run --read-only --tmpfs /tmp -v DATA:/data --network host IMAGE` runs them: the image's
root filesystem mounted read-only, a fresh tmpfs on /tmp and /run, a host directory on /data, the
image's user, environment and entrypoint, and the stop signal sent to the container's process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "BASE_REPOSITORY",
    "Buildah",
    "BuildahError",
    "Container",
    "build_image",
    "debian_mirror",
    "ensure_base_image",
    "storage_lock",
    "unavailable_reason",
]

BASE_REPOSITORY = "localhost/taskbroker-base"
BASE_SUITE = "bookworm"
#: Debian's python3 is 3.11 in bookworm; python3-venv brings ensurepip for `python3 -m venv`.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
#: Bump when the recipe below changes in a way that its inputs (suite, packages, mirror, local
#: CA certificates) do not show, so that the cached base image is rebuilt.
BASE_RECIPE = 1
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: CA certificates this machine adds to Debian's (a TLS-inspecting proxy on the way to PyPI, say).
#: The base image trusts them too, as a base image made on this network would.
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

#: Mount the image's root read-only with a tmpfs on /tmp and /run, in the mount namespace of this
#: shell only (`unshare --mount`), then run buildah in it. buildah's chroot isolation bind-mounts
#: that root, read-only as it is. /run is a tmpfs because buildah adds and removes
#: /run/.containerenv there.
_READ_ONLY_RUN = """set -e
root=$1
shift
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
exec "$@"
"""


class BuildahError(RuntimeError):
    """A buildah (or debootstrap) command failed; the message has the tail of its output."""


def unavailable_reason() -> str | None:
    """Why containers cannot be built and run here, or None when they can."""
    if os.geteuid() != 0:
        return "not root (buildah --isolation chroot and the read-only mounts need root)"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot create a mount namespace: {probe.stderr.strip()}"
    return None


@contextlib.contextmanager
def storage_lock(root: Path) -> Iterator[None]:
    """Holds an exclusive lock on the test storage, so two runs do not build the base at once."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Buildah:
    """The buildah command on storage of its own (root and run directories, storage driver)."""

    def __init__(self, root: Path, driver: str = "overlay") -> None:
        self.root = root
        self.global_args = [
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "run"),
            "--storage-driver",
            driver,
        ]

    def command(self, *args: str) -> list[str]:
        return ["buildah", *self.global_args, *args]

    def run(self, *args: str, timeout: float = 300, log: Path | None = None) -> str:
        """Runs buildah. Returns its stdout (with `log`: the output goes there instead).

        Raises:
            BuildahError: It failed or timed out.
        """
        if log is None:
            return _run(self.command(*args), timeout=timeout)
        with log.open("ab") as out:
            _run(self.command(*args), timeout=timeout, stdout=out)
        return ""

    def image_exists(self, ref: str) -> bool:
        result = subprocess.run(
            self.command("inspect", "--type", "image", ref), capture_output=True, check=False
        )
        return result.returncode == 0

    def inspect_image(self, ref: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.run("inspect", "--type", "image", ref))
        return info

    def image_size(self, ref: str) -> str:
        """The image's size as buildah prints it ("245 MB")."""
        images: list[dict[str, Any]] = json.loads(self.run("images", "--json", ref))
        return str(images[0]["size"])


def _run(argv: Sequence[str], *, timeout: float, stdout: IO[bytes] | None = None) -> str:
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT if stdout is not None else subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildahError(f"{' '.join(argv[:6])} ... timed out after {timeout:.0f}s") from exc
    if result.returncode != 0:
        output = (result.stderr or b"").decode(errors="replace")[-4000:]
        raise BuildahError(f"{' '.join(argv)} exited {result.returncode}:\n{output}")
    return (result.stdout or b"").decode(errors="replace")


# --- the base image ---------------------------------------------------------------------------


def debian_mirror(
    environ: Mapping[str, str] | None = None, apt_dir: Path = Path("/etc/apt")
) -> str:
    """The Debian mirror this machine's apt uses for BASE_SUITE (DEBIAN_MIRROR overrides it)."""
    environ = os.environ if environ is None else environ
    if environ.get("DEBIAN_MIRROR"):
        return environ["DEBIAN_MIRROR"]
    for sources in sorted(apt_dir.glob("sources.list.d/*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            fields = _deb822(stanza)
            if (
                "deb" in fields.get("types", "").split()
                and BASE_SUITE in fields.get("suites", "").split()
            ):
                return fields["uris"].split()[0]
    lists = [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == BASE_SUITE:
                return words[1]
    return DEFAULT_MIRROR


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def base_image_ref(mirror: str, local_cas: Sequence[Path]) -> str:
    """`localhost/taskbroker-base:bookworm-<hash of everything the image is made from>`."""
    digest = hashlib.sha256()
    recipe = {
        "recipe": BASE_RECIPE,
        "suite": BASE_SUITE,
        "packages": BASE_PACKAGES,
        "mirror": mirror,
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for ca in sorted(local_cas):
        digest.update(ca.name.encode() + b"\0" + ca.read_bytes())
    return f"{BASE_REPOSITORY}:{BASE_SUITE}-{digest.hexdigest()[:16]}"


def ensure_base_image(buildah: Buildah, log: Path) -> str:
    """A local Debian bookworm image with Python 3.11 and venv; built once, then reused.

    Returns:
        Its reference, for `--build-arg BASE_IMAGE=...`.
    """
    mirror = debian_mirror()
    local_cas = sorted(LOCAL_CA_DIR.glob("*.crt"))
    ref = base_image_ref(mirror, local_cas)
    if buildah.image_exists(ref):
        return ref
    scratch = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=buildah.root))
    rootfs = scratch / "rootfs"
    try:
        with log.open("ab") as out:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=" + ",".join(BASE_PACKAGES),
                    BASE_SUITE,
                    str(rootfs),
                    mirror,
                ],
                timeout=1200,
                stdout=out,
            )
            if local_cas:
                for ca in local_cas:
                    shutil.copy2(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
                _run(["chroot", str(rootfs), "update-ca-certificates"], timeout=120, stdout=out)
        for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "var/log/*.log"):
            for path in rootfs.glob(pattern):
                if path.is_file():
                    path.unlink()
        _commit_rootfs(buildah, rootfs, ref, trust_local_cas=bool(local_cas))
    finally:
        _unmount_below(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    for image in json.loads(buildah.run("images", "--json") or "[]"):
        for name in image.get("names") or []:
            if name != ref and name.startswith(BASE_REPOSITORY + ":"):
                buildah.run("rmi", name)  # an older recipe's base
    return ref


def _commit_rootfs(buildah: Buildah, rootfs: Path, ref: str, *, trust_local_cas: bool) -> None:
    container = buildah.run("from", "scratch").strip()
    try:
        mountpoint = buildah.run("mount", container).strip()
        _run(["cp", "-a", f"{rootfs}/.", mountpoint], timeout=600)
        buildah.run("umount", container)
        config = ["--env", f"PATH={BASE_PATH}", "--env", "LANG=C.UTF-8", "--cmd", "/bin/bash"]
        if trust_local_cas:
            # pip trusts its own CA bundle, not Debian's, unless told.
            config += ["--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]
        buildah.run("config", *config, container)
        buildah.run("commit", "--rm", container, ref, timeout=600)
    except BaseException:
        with contextlib.suppress(BuildahError):
            buildah.run("rm", container)
        raise


def _unmount_below(directory: Path) -> None:
    """Unmounts whatever a killed debootstrap left mounted inside `directory` (proc, sys)."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)


# --- images -----------------------------------------------------------------------------------


def build_image(
    buildah: Buildah, context: Path, *, base: str, target: str, tag: str, log: Path
) -> None:
    """`buildah bud` of context/Dockerfile's `target` on the local base image.

    Docker format keeps the HEALTHCHECK (OCI image configs have no such field); --layers caches
    each step, so an unchanged Dockerfile and context rebuild in seconds.
    """
    buildah.run(
        "bud",
        "--pull=never",
        "--isolation",
        "chroot",
        "--format",
        "docker",
        "--layers",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--target",
        target,
        "--tag",
        tag,
        "--file",
        str(context / "Dockerfile"),
        str(context),
        log=log,
        timeout=1500,
    )


# --- containers -------------------------------------------------------------------------------


class Container:
    """One container of an image, run like `docker run --read-only --tmpfs /tmp -v DATA:/data
    --network host`. Its process is the image's entrypoint unless `command` is given."""

    def __init__(
        self,
        buildah: Buildah,
        image: str,
        *,
        data_dir: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self._buildah = buildah
        self.image = image
        self.data_dir = data_dir
        self.log = log
        self.env = dict(env or {})
        config = buildah.inspect_image(image)["Docker"]["config"]
        self.config: dict[str, Any] = config
        self.argv = list(command or [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])])
        self.name = ""
        self.rootfs = Path()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.name = self._buildah.run("from", "--pull=never", self.image).strip()
        if "/data" in (self.config.get("Volumes") or {}):
            # `-v DATA:/data` replaces the image's VOLUME; buildah would mount an anonymous
            # volume over it unless the container forgets the VOLUME.
            self._buildah.run("config", "--volume", "/data-", self.name)
        self.rootfs = Path(self._buildah.run("mount", self.name).strip())
        # What a container runtime mounts over (hosts, resolv.conf) needs a file to mount on,
        # and a read-only root cannot get one later. Docker adds them the same way.
        for name in ("etc/hosts", "etc/hostname", "etc/resolv.conf"):
            (self.rootfs / name).touch(exist_ok=True)
        for name in ("tmp", "run"):
            if not (self.rootfs / name).is_dir():
                raise BuildahError(f"the image has no /{name} to mount on")
        self.process = self._spawn(self.argv, self.env, self.log)

    def _spawn(
        self, argv: Sequence[str], env: Mapping[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        run = self._buildah.command(
            "run",
            "--isolation",
            "chroot",
            "--network",
            "host",
            # The image's VOLUME: without this, buildah would give /data an anonymous volume.
            f"--volume={self.data_dir}:/data:rw",
            *(f"--env={key}={value}" for key, value in env.items()),
            self.name,
            "--",
            *argv,
        )
        with log.open("ab") as out:
            return subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    _READ_ONLY_RUN,
                    "sh",
                    str(self.rootfs),
                    *run,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def exec(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> tuple[int, str]:
        """Runs another process in this container's image and root (like `docker exec`), with
        the container's environment plus `env`. Returns its exit code and output."""
        with tempfile.NamedTemporaryFile(prefix="exec-", suffix=".log") as output:
            process = self._spawn(argv, {**self.env, **(env or {})}, Path(output.name))
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(process.pid)
                process.wait()
                raise
            return code, Path(output.name).read_text(errors="replace")

    def main_pid(self, timeout: float = 30) -> int:
        """The pid of the container's own process: the child of buildah's chroot-exec helper,
        once that helper has dropped privileges and executed the command."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _descendants(self.process.pid):
                if _argv0(_parent(pid)) == "buildah-chroot-exec" and not _is_buildah(pid):
                    return pid
            if self.process.poll() is not None:
                code = self.process.returncode
                raise BuildahError(f"the container exited ({code}):\n{self.tail()}")
            time.sleep(0.05)
        raise BuildahError("the container's process did not appear")

    def stop(self, timeout: float) -> int:
        """Sends the image's STOPSIGNAL to the container's process, as `docker stop` does, and
        waits for the container to exit. Returns its exit code."""
        stop_signal = signal.Signals[self.config.get("StopSignal") or "SIGTERM"]
        os.kill(self.main_pid(), stop_signal)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _kill_tree(self.process.pid)
            self.process.wait(30)
        if self.name:
            with contextlib.suppress(BuildahError):
                self._buildah.run("umount", self.name)
            with contextlib.suppress(BuildahError):
                self._buildah.run("rm", self.name)
            self.name = ""

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    """Every descendant of pid, parents before children."""
    children = _children()
    found: list[int] = []
    queue = list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _is_buildah(pid: int) -> bool:
    """buildah and its chroot helpers (re-executed from a memfd: comm "memfd:buildah-c...")."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return True  # gone already: not the process to wait for
    return "buildah" in comm or Path(_argv0(pid)).name.startswith("buildah")


def _kill_tree(pid: int) -> None:
    for child in reversed(_descendants(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
