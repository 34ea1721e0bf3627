"""Encoding on the CPU: the whole `encode_folder` against the bare encoder, and memory.

Prints, measured side by side in one run:

(a) images per second of the whole `encode_folder` (scan, decode, fit to the
    canvas, encode as is and flipped, HDF5 writes) against the bare encoder
    forwards on the same batches already in memory, interleaved round by round
    (best round of each); the ratio is the pipeline's overhead (target: 1.3x or
    less). The bare forward is timed both batched and one image per forward (what
    `encode_folder` runs, so that tokens never depend on the batch size);
(b) peak resident memory of encoding 200 and 2,000 images, each in a fresh
    subprocess (`ru_maxrss` of the process and of its DataLoader worker), and the
    ratio (target: 1.2 or less), plus the growth over the memory held before
    encoding started.

Images are photos-like: crops of the bundled photos at sizes from 40 to 320 px,
written as PNG. Models are randomly initialised: the photos recipe's VQ-GAN at 64 px
for (a), the tiny recipe's at 32 px for (b), where only memory matters.

    python benchmarks/encode.py                      # a few minutes
    python benchmarks/encode.py --images 32 --small 20 --large 100 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160, help="images for (a)")
    parser.add_argument("--small", type=int, default=200, help="first size for (b)")
    parser.add_argument("--large", type=int, default=2000, help="second size for (b)")
    parser.add_argument("--batch-size", type=int, default=32, help="encode batch")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds for (a)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "OUT", "RUN"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------- inputs


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` PNG crops of the bundled photos, 40 to 320 px a side, varied shapes."""
    from sundae_cli.datasets import PHOTOS_DIR
    from sundae_cli.images import load_rgb

    photos = [load_rgb(p) for p in sorted(PHOTOS_DIR.iterdir())]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width = int(rng.integers(40, min(320, photo.width) + 1))
        height = int(rng.integers(40, min(320, photo.height) + 1))
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        path = folder / f"{index:05d}.png"
        photo.crop((left, top, left + width, top + height)).save(path)
        paths.append(path)
    return paths


def make_run(recipe_name: str, out: Path) -> Path:
    """A randomly initialised autoencoder run of a bundled recipe, on the CPU."""
    import torch

    from sundae_cli.checkpoints import save_checkpoint
    from sundae_cli.plugins import get_autoencoder_backend
    from sundae_cli.recipes import load_recipe
    from sundae_cli.runs import create_run

    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.toml", ['device="cpu"'])
    torch.manual_seed(0)
    model = get_autoencoder_backend("vqgan").build(recipe.autoencoder.config)
    run = create_run("autoencoder", recipe.name, {}, out=out)
    meta = {"kind": "autoencoder", "recipe": recipe.to_dict()}
    save_checkpoint(run.path, 1, model.state_dict(), None, meta)
    return run.path


# ---------------------------------------------------------------- (a) throughput


def time_pipeline(folder: Path, out: Path, loaded, args) -> float:
    """Seconds for one complete `encode_folder` into a fresh file."""
    from sundae_cli.encode import encode_folder

    out.unlink(missing_ok=True)
    started = time.perf_counter()
    encode_folder(
        folder,
        out,
        loaded,
        batch_size=args.batch_size,
        num_workers=args.workers,
        overwrite=True,
    )
    return time.perf_counter() - started


def time_bare(model, batches, per_image: bool) -> float:
    """Seconds for the encoder forwards alone (as is and flipped) on `batches`."""
    import torch

    from sundae_cli.encode import encode_each

    encode = (lambda x: encode_each(model, x)) if per_image else model.encode
    started = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            encode(batch)
            encode(torch.flip(batch, dims=[3]))
    return time.perf_counter() - started


def throughput(args, work: Path) -> None:
    import torch

    from sundae_cli.images import fit_to, load_rgb, to_tensor
    from sundae_cli.models import load_autoencoder

    folder = work / "photos-like"
    paths = write_images(folder, args.images)
    loaded = load_autoencoder(
        make_run("photos", work / "ae-photos"), torch.device("cpu")
    )
    size = tuple(loaded.recipe.data.image_size)
    tensors = torch.stack([to_tensor(fit_to(load_rgb(p), size)) for p in paths])
    batches = list(tensors.split(args.batch_size))
    time_bare(loaded.model, batches[:1], per_image=False)  # warm-up

    workers = sorted({0, 1, 2, args.workers})
    times: dict[str, list[float]] = {"batched": [], "per_image": []}
    for _ in range(args.rounds):
        for count in workers:
            args_w = argparse.Namespace(**{**vars(args), "workers": count})
            seconds = time_pipeline(folder, work / "a.h5", loaded, args_w)
            times.setdefault(f"pipeline-{count}", []).append(seconds)
        times["batched"].append(time_bare(loaded.model, batches, per_image=False))
        times["per_image"].append(time_bare(loaded.model, batches, per_image=True))
    best = {key: min(values) for key, values in times.items()}

    print(
        f"(a) {args.images} images -> {size[0]}x{size[1]} px, photos VQ-GAN "
        f"(f={loaded.model.downsample_factor}), batch {args.batch_size}, "
        f"{args.threads} torch thread(s), best of {args.rounds} interleaved rounds"
    )
    rows = [
        (f"pipeline-{n}", f"encode_folder, {n} decoding worker(s)") for n in workers
    ]
    rows += [
        ("batched", "bare encoder, batched forwards x2"),
        ("per_image", "bare encoder, one image per forward x2"),
    ]
    for key, label in rows:
        rate = args.images / best[key]
        print(f"    {label:<42} {best[key]:7.2f} s  {rate:7.1f} images/s")
    for count in workers:
        pipeline = best[f"pipeline-{count}"]
        print(
            f"    ratio encode_folder ({count} worker(s)) / bare: batched "
            f"{pipeline / best['batched']:.2f}x, per image "
            f"{pipeline / best['per_image']:.2f}x  (target <= 1.3x)"
        )


# ---------------------------------------------------------------- (b) memory


def child(folder: str, out: str, run: str, args) -> None:
    """Encode FOLDER with RUN in this fresh process; print peak memory as JSON.

    The process's own peak is VmHWM (reset by exec; `ru_maxrss` of a subprocess
    still holds its forking parent's size). The worker's is `RUSAGE_CHILDREN`; a
    forked worker shares most pages with this process, so the sum overstates.
    """
    import torch

    from sundae_cli.encode import encode_folder
    from sundae_cli.models import load_autoencoder

    loaded = load_autoencoder(run, torch.device("cpu"))
    before = _proc_status("VmRSS")
    result = encode_folder(
        Path(folder),
        Path(out),
        loaded,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    peaks = {
        "images": result.sources,
        "before_kib": before,
        "self_kib": _proc_status("VmHWM"),
        "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }
    print(json.dumps(peaks))


def _proc_status(field: str) -> int:
    """A memory field of /proc/self/status in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_child(folder: Path, out: Path, run: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", str(folder), str(out), str(run)]
    command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args, work: Path) -> None:
    run = make_run("tiny", work / "ae-tiny")
    started = time.perf_counter()
    large = write_images(work / "large", args.large, seed=1)
    small = work / "small"
    small.mkdir()
    for path in large[: args.small]:
        os.link(path, small / path.name)
    made = time.perf_counter() - started
    peaks = {
        count: measure_child(folder, work / f"{count}.h5", run, args)
        for count, folder in ((args.small, small), (args.large, work / "large"))
    }

    print(
        f"(b) peak resident memory, tiny VQ-GAN (32 px), batch {args.batch_size}, "
        f"{args.workers} worker(s); images written in {made:.0f} s"
    )
    for count, peak in peaks.items():
        mib = {key: value / 1024 for key, value in peak.items() if key != "images"}
        print(
            f"    {count:>6} images: process peak {mib['self_kib']:6.1f} MiB "
            f"(+{mib['self_kib'] - mib['before_kib']:.1f} MiB while encoding), "
            f"worker peak {mib['children_kib']:6.1f} MiB"
        )
    small_peak, large_peak = peaks[args.small], peaks[args.large]
    for label, keys in (
        ("process", ("self_kib",)),
        ("process + worker", ("self_kib", "children_kib")),
    ):
        ratio = sum(large_peak[k] for k in keys) / sum(small_peak[k] for k in keys)
        print(
            f"    ratio {args.large} / {args.small} images, {label}: {ratio:.3f}"
            "  (target <= 1.2)"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child, args)
        return
    with tempfile.TemporaryDirectory(prefix="sundae-bench-") as tmp:
        work = Path(tmp)
        os.environ["SUNDAE_HOME"] = str(work / "home")
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {_load()}")
        if not args.skip_throughput:
            throughput(args, work)
        if not args.skip_memory:
            memory(args, work)


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
