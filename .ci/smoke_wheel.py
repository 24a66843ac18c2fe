"""CI: the wheel works as a user installs it. Builds it, checks what it ships, installs it
(--no-deps) into a fresh venv that borrows the dev venv's dependencies through a .pth
file, and from an empty temporary directory runs the installed `distillgate`: --help,
`students list`, `law show`, and `serve` on the default config until /ready.

    .venv/bin/python .ci/smoke_wheel.py [--store var/test-store]    # make smoke-wheel

Run from the repo root with the dev venv's Python. `serve` loads the real teacher from
--store (converted there on first use, ~30 s, as `make test` already did).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

MUST_SHIP = (
    "distillgate_deploy/default.yaml",
    "distillgate_deploy/policy.yaml",
    "distillgate_deploy/sweeps/default.yaml",
    "models/tasks/data/general_knowledge.jsonl",
    "gateway/cli.py",
    "gateway/instant.py",
    "law/cli.py",
    "models/cli.py",
)
MUST_NOT_SHIP = ("tests/", "bench/", "var/", "docs/", "deploy/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/test-store"),
                        help="model store with (or to receive) the converted teacher")  # fmt: skip
    args = parser.parse_args()
    repo = Path.cwd()
    if not (repo / "pyproject.toml").is_file():
        sys.exit("smoke_wheel: run it from the repo root")
    with tempfile.TemporaryDirectory(prefix="distillgate-wheel-") as tmp:
        root = Path(tmp)
        wheel = build(repo, root / "dist")
        check_contents(wheel)
        bin_dir = install(wheel, root / "venv")
        work = root / "work"  # empty: nothing may depend on the repo being here
        work.mkdir()
        run_commands(bin_dir, work, repo, args.store.resolve())
    print("smoke_wheel: ok")
    return 0


def build(repo: Path, dist: Path) -> Path:
    # Without isolation when setuptools is at hand (fast, offline); else pip fetches it.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *isolation,
         "-w", str(dist), str(repo)])  # fmt: skip
    (wheel,) = dist.glob("distillgate-*.whl")
    return wheel


def check_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    missing = [n for n in MUST_SHIP if n not in names]
    extra = sorted({n.split("/")[0] for n in names if n.startswith(MUST_NOT_SHIP)})
    if missing or extra:
        sys.exit(f"smoke_wheel: {wheel.name} lacks {missing} or ships {extra}")
    print(f"smoke_wheel: {wheel.name}: {len(names)} files, package data present")


def install(wheel: Path, venv: Path) -> Path:
    """A venv of its own for distillgate; its dependencies are the dev venv's."""
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    # A path in a .pth file joins sys.path, but .pth files inside it are not run: the dev
    # venv's editable install (a finder that maps `gateway` to the repo) stays out.
    Path(site, "dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed",
         "--no-index", str(wheel)])  # fmt: skip
    code = "import gateway, distillgate_deploy as d; print(gateway.__file__, d.__file__)"
    where = subprocess.check_output([python, "-c", code], text=True, cwd=venv)
    if any(not p.startswith(site) for p in where.split()):
        sys.exit(f"smoke_wheel: the venv imports distillgate from elsewhere: {where}")
    return venv / "bin"


def run_commands(bin_dir: Path, work: Path, repo: Path, store: Path) -> None:
    cli = str(bin_dir / "distillgate")
    expect(run([cli, "--help"], cwd=work), "serve")
    expect(run([cli, "students", "list", "--store", str(work / "store"), "--json"], cwd=work), "[]")
    law = run([cli, "law", "show", str(repo / "docs" / "results" / "law.json")], cwd=work)
    expect(law, "law v1 for ")
    serve_until_ready(cli, work, store)


def serve_until_ready(cli: str, work: Path, store: Path, timeout_s: float = 300) -> None:
    """`distillgate serve` with no --config (the shipped default) until /ready, then stop."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([cli, "serve", "--port", str(port), "--store", str(store)],
                                cwd=work, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while not answers_200(f"http://127.0.0.1:{port}/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"smoke_wheel: serve not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"smoke_wheel: serve ready on :{port} from the wheel's default config")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def answers_200(url: str) -> bool:
    with (
        contextlib.suppress(urllib.error.URLError, OSError),
        urllib.request.urlopen(url, timeout=2) as response,
    ):
        return response.status == 200
    return False


def run(argv: list, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        sys.exit(f"smoke_wheel: {' '.join(map(str, argv))} failed ({done.returncode}):\n"
                 f"{done.stdout[-2000:]}{done.stderr[-3000:]}")  # fmt: skip
    return done.stdout


def expect(output: str, text: str) -> None:
    if text not in output:
        sys.exit(f"smoke_wheel: expected {text!r} in:\n{output[-2000:]}")


if __name__ == "__main__":
    sys.exit(main())
