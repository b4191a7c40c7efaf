"""make test-packages: the SDK and the Node client installed as users install them, then run.

Builds the SDK's wheel and sdist, installs each (and the source directory, and the git URL
when the repository is a git clone) into a fresh venv outside the repository, and runs an
application's worker and producer (tests/packages/python_app) from there against a live broker
(`python -m broker` from the repo venv, with its embedded Redis). The same for the Node client:
`npm pack`, the tarball installed into an empty directory, tests/packages/node_app run there.
And the TypeScript client generated from proto/ (make proto-ts): type-checked and compiled by
tsc, its worker and producer (clients/ts/src) run.
This needs PyPI and npm (the installs resolve the packages' dependencies), so it is not part
of `make test`.

    python -m tests.packages.check [--only wheel,sdist,path,git,node,ts]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from tests.support.broker_process import BrokerProcess

ROOT: Final = Path(__file__).resolve().parents[2]
HERE: Final = Path(__file__).resolve().parent
SDK_DIR: Final = ROOT / "clients" / "python"
NODE_DIR: Final = ROOT / "clients" / "node"
#: Installing grpcio and friends from an index on a loaded machine can take minutes.
INSTALL_TIMEOUT_S: Final = 900
#: The producer waits for five tasks; a worker needs a few seconds to start.
RUN_TIMEOUT_S: Final = 120
TS_DIR: Final = ROOT / "clients" / "ts"
KINDS: Final = ("wheel", "sdist", "path", "git", "node", "ts")


class CheckFailed(Exception):
    """A step failed; the message says which and carries its output."""


def run(command: Sequence[str | Path], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Runs a command to completion; raises CheckFailed with its output when it fails."""
    shown = " ".join(str(part) for part in command)
    print(f"  $ {shown}", flush=True)
    try:
        done = subprocess.run(
            [str(part) for part in command],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"{shown}: timed out after {timeout:.0f}s\n{exc.output or ''}") from None
    if done.returncode != 0:
        raise CheckFailed(f"{shown}: exit {done.returncode}\n{done.stdout}")
    return done.stdout


def user_env(target: str, queue: str) -> dict[str, str]:
    """The environment of a user's shell: nothing that points into the repository."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "NODE_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TASKBROKER_")}
    return env | {"TASKBROKER_TARGET": target, "TASKBROKER_QUEUE": queue}


def run_app(
    worker: Sequence[str | Path], producer: Sequence[str | Path], app: Path, env: dict[str, str]
) -> str:
    """Starts the worker, runs the producer to completion, then stops the worker with SIGTERM,
    which must end it cleanly (exit 0). Returns what the producer printed."""
    log = app / "worker.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(part) for part in worker], cwd=app, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        output = run(producer, cwd=app, env=env, timeout=RUN_TIMEOUT_S)
        print(output.rstrip(), flush=True)
    except CheckFailed as exc:
        raise CheckFailed(f"{exc}\nworker log:\n{log.read_text()}") from None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    if code != 0:
        raise CheckFailed(f"worker exited {code} after SIGTERM:\n{log.read_text()}")
    return output


def check_python(kind: str, spec: str, work: Path, target: str) -> None:
    """A fresh venv outside the repository installs the SDK from `spec` and runs the app."""
    venv = work / f"venv-{kind}"
    app = work / f"app-{kind}"
    shutil.copytree(HERE / "python_app", app)
    env = user_env(target, f"packages-{kind}")
    run([sys.executable, "-m", "venv", venv], cwd=work, env=env, timeout=120)
    python = venv / "bin" / "python"
    run(
        [python, "-m", "pip", "install", "--quiet", spec],
        cwd=work,
        env=env,
        timeout=INSTALL_TIMEOUT_S,
    )
    # The generated API must come from the installed package, not from a development tree.
    where = run(
        [python, "-c", "import taskbroker.v1.task_pb2 as m; print(m.__file__)"],
        cwd=app,
        env=env,
        timeout=60,
    ).strip()
    if not Path(where).is_relative_to(venv):
        raise CheckFailed(f"taskbroker.v1 was imported from {where}, not from {venv}")
    run([venv / "bin" / "taskbroker", "--help"], cwd=app, env=env, timeout=60)
    run_app([python, "worker.py"], [python, "producer.py"], app, env)
    # The README's quick-start files, unchanged, against the installed SDK.
    quick = work / f"quickstart-{kind}"
    quick.mkdir()
    for name in ("quickstart_worker.py", "quickstart_producer.py"):
        shutil.copy(ROOT / "examples" / name, quick / name)
    printed = run_app(
        [python, "quickstart_worker.py"], [python, "quickstart_producer.py"], quick, env
    )
    if "SUCCEEDED sent" not in printed:
        raise CheckFailed(f"the quick-start producer printed {printed!r}")


def check_node(work: Path, target: str) -> None:
    """The Node client's npm tarball, installed into an empty directory, runs the app."""
    env = user_env(target, "packages-node")
    packed = work / "npm"
    packed.mkdir()
    run(
        ["npm", "pack", "--silent", "--pack-destination", packed],
        cwd=NODE_DIR,
        env=env,
        timeout=300,
    )
    (tarball,) = packed.glob("*.tgz")
    app = work / "app-node"
    shutil.copytree(HERE / "node_app", app)
    run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", tarball],
        cwd=app,
        env=env,
        timeout=INSTALL_TIMEOUT_S,
    )
    run_app(["node", "worker.mjs"], ["node", "producer.mjs"], app, env)


def check_ts(work: Path, target: str) -> None:
    """The TypeScript client generated from proto/ (make proto-ts) type-checks with tsc, and its
    worker and producer (clients/ts/src) run."""
    env = user_env(target, "packages-ts")
    if not (TS_DIR / "src" / "gen").is_dir():
        raise CheckFailed("clients/ts/src/gen is missing: run `make proto-ts`")
    run([TS_DIR / "node_modules" / ".bin" / "tsc", "-p", TS_DIR], cwd=TS_DIR, env=env, timeout=300)
    app = work / "app-ts"
    app.mkdir()
    dist = TS_DIR / "dist"
    run_app(["node", dist / "worker.js"], ["node", dist / "producer.js"], app, env)


def checks(only: set[str], work: Path, target: str) -> list[tuple[str, Callable[[], None]]]:
    """The checks to run, by name, with the SDK's wheel and sdist built when one needs them."""
    chosen: list[tuple[str, Callable[[], None]]] = []
    dist = work / "dist"
    if only & {"wheel", "sdist"}:
        env = user_env(target, "")
        run(
            [sys.executable, "-m", "build", "--outdir", dist, SDK_DIR],
            cwd=work,
            env=env,
            timeout=INSTALL_TIMEOUT_S,
        )
    specs: dict[str, Callable[[], str]] = {
        "wheel": lambda: str(next(dist.glob("*.whl"))),
        "sdist": lambda: str(next(dist.glob("*.tar.gz"))),
        "path": lambda: str(SDK_DIR),
        # pip clones the repository's HEAD: in CI, the commit under test. file://localhost/...,
        # because pip 23 (Python 3.11's venv) rejects `name @ git+file:///...` as invalid.
        "git": lambda: f"taskbroker @ git+file://localhost{ROOT}#subdirectory=clients/python",
    }
    for kind, spec in specs.items():
        if kind in only:
            chosen.append((kind, functools.partial(check_python, kind, spec(), work, target)))
    if "node" in only:
        chosen.append(("node", functools.partial(check_node, work, target)))
    if "ts" in only:
        chosen.append(("ts", functools.partial(check_ts, work, target)))
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(KINDS), help=f"comma-separated: {','.join(KINDS)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    only = {kind.strip() for kind in args.only.split(",") if kind.strip()}
    if unknown := only - set(KINDS):
        parser.error(f"unknown checks: {', '.join(sorted(unknown))}")
    if "git" in only and not (ROOT / ".git").exists():
        print("git: skipped, the repository is not a git clone", flush=True)
        only.discard("git")
    work = Path(tempfile.mkdtemp(prefix="taskbroker-packages-"))
    broker = BrokerProcess(work / "broker-data")
    passed: list[str] = []
    failed: list[str] = []
    try:
        broker.wait_serving()
        target = f"127.0.0.1:{broker.port}"
        for name, check in checks(only, work, target):
            print(f"{name}: installing and running", flush=True)
            started = time.monotonic()
            try:
                check()
            except CheckFailed as exc:
                print(f"{name}: FAILED\n{exc}", flush=True)
                failed.append(name)
            else:
                print(f"{name}: ok ({time.monotonic() - started:.0f}s)", flush=True)
                passed.append(name)
    except CheckFailed as exc:
        print(f"FAILED\n{exc}", flush=True)
        failed.append("build")
    finally:
        broker.terminate()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"package checks: {len(passed)} passed, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
