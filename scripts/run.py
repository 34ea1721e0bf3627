#!/usr/bin/env python3
"""Set up a virtual environment and run the main job or the test suite.

    python3 scripts/run.py demo    # install, then generate with the bundled model
    python3 scripts/run.py test    # install (with dev tools), then lint and run pytest

Needs only Python 3.11+. The environment lives in `.venv` (or `$SUNDAE_VENV`) and is
reinstalled only when pyproject.toml changes. torch is installed first as
`$SUNDAE_TORCH` (default `torch==2.13.0`, the CPU build); set it to another
requirement, for example a CUDA build's version, before the first run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SUNDAE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
DEMO_OUT = Path(os.environ.get("SUNDAE_DEMO_OUT", ROOT / "sundae-out"))


def run(*args: str | Path, **kwargs) -> None:
    print("+", " ".join(str(a) for a in args), file=sys.stderr, flush=True)
    subprocess.run([str(a) for a in args], check=True, **kwargs)


def ensure_env() -> None:
    """Create the venv and install the project (with dev extras) if needed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may run on old Pythons
        sys.exit("error: sundae needs Python 3.11 or newer")
    if not PYTHON.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".sundae-install"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    has_torch = (
        subprocess.run(
            [str(PYTHON), "-c", "import torch"], capture_output=True
        ).returncode
        == 0
    )
    pip = [PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if not has_torch:
        run(*pip, os.environ.get("SUNDAE_TORCH", "torch==2.13.0"))
    run(*pip, "-e", f"{ROOT}[dev]")
    stamp.write_text(digest)


def demo() -> None:
    """The main job: samples and an inpainting from the bundled digits model."""
    sundae = BIN / "sundae"
    samples, inpainted = DEMO_OUT / "samples", DEMO_OUT / "inpaint"
    run(
        sundae, "sample", "-n", "64", "--model", "bundled", "--grid",
        "--out", samples, "--overwrite",
    )  # fmt: skip
    examples = ROOT / "examples"
    # The example is a 3 with its lower half masked; the bundled prior is
    # class-conditional, so ask for completions as a 3 (without --class the eight
    # completions would be conditioned on classes 0..7 in turn).
    run(
        sundae, "inpaint", examples / "digit.png", examples / "mask.png",
        "-n", "8", "--class", "3", "--model", "bundled",
        "--out", inpainted, "--overwrite",
    )  # fmt: skip
    strip = inpaint_strip(examples, inpainted, DEMO_OUT / "inpaint-strip.png")
    print(f"samples:    {samples}/ (grid: {samples / 'grid.png'})")
    print(f"inpainting: {inpainted}/ (overview: {strip})")


def inpaint_strip(examples: Path, folder: Path, out: Path) -> Path:
    """Input, mask and the completions side by side, for the README."""
    code = (
        "import sys; from pathlib import Path; from PIL import Image\n"
        "from sundae_cli.images import make_grid\n"
        "ex, folder, out = map(Path, sys.argv[1:])\n"
        "tiles = [Image.open(ex / 'digit.png').convert('RGB'),\n"
        "         Image.open(ex / 'mask.png').convert('RGB')]\n"
        "tiles += [Image.open(p).convert('RGB')\n"
        "          for p in sorted(folder.glob('inpaint-*.png'))]\n"
        "make_grid(tiles, ncols=len(tiles)).save(out)\n"
    )
    run(PYTHON, "-c", code, examples, folder, out)
    return out


def test() -> None:
    run(PYTHON, "-m", "ruff", "check", ".", cwd=ROOT)
    run(PYTHON, "-m", "ruff", "format", "--check", ".", cwd=ROOT)
    run(PYTHON, "-m", "pytest", "-q", cwd=ROOT)


def main() -> None:
    tasks = {"demo": demo, "test": test}
    if len(sys.argv) != 2 or sys.argv[1] not in tasks:
        sys.exit("usage: python3 scripts/run.py demo|test")
    ensure_env()
    try:
        tasks[sys.argv[1]]()
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
