"""Peak memory of one site's work, measured point by point: what brats_fl/memory.py's model is fitted on.

Each point runs in a fresh Python process, so that one point's allocations cannot raise the next one's peak:

- train: one training step of BratsSegResNet (batch 1, Adam, fp32, soft Dice loss) on one crop;
- val: the sliding-window validation of one whole volume (brats_fl.pipeline.predict_regions, window = the roi).

The figure recorded is the child's peak resident set size, read by the parent from os.wait4's rusage (ru_maxrss,
KiB on Linux). Nothing is subtracted: it includes the Python interpreter, torch and MONAI as imported, the model
and (train) Adam's state, the input tensors and every activation and gradient at its high point. The RSS a child
has right after its imports is recorded as well (``rss_after_imports_mb``), so that the part the work adds can be
read off. Seconds are wall time under whatever load the machine had (the load average is printed); RSS is not
affected by load. Mixed precision (AMP) is CUDA-only: ``--device cuda`` runs every point in fp32 and in AMP on GPU 0
and records ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) besides the RSS.

    python -m benchmarks.memory_points                        # the 13 points below -> figs/memory_points_cpu.csv
    python -m benchmarks.memory_points --smoke --out /tmp/m.csv   # 2 tiny points, to check the benchmark works
    python -m benchmarks.memory_points --device cuda          # 26 points on GPU 0 -> figs/memory_points_cuda.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from brats_fl.settings import EXIT_BAD_INPUT, REPO_DIR

OUT = REPO_DIR / "figs" / "memory_points_cpu.csv"
BRATS_VOLUME = (240, 240, 155)
PAPER_WINDOW = (240, 240, 160)  # job.py's default --infer_roi_size: one window per BraTS volume
THREADS = 2
COLUMNS = [
    "kind",
    "init_filters",
    "size",
    "window",
    "voxels",
    "window_voxels",
    "peak_rss_mb",
    "rss_after_imports_mb",
    "seconds",
    "threads",
    "device",
    "amp",
    "gpu_peak_allocated_mb",  # torch.cuda.max_memory_allocated, on CUDA only
    "gpu_peak_reserved_mb",  # torch.cuda.max_memory_reserved: what the caching allocator held
]


@dataclass(frozen=True)
class Point:
    kind: str  # "train" (size = crop) or "val" (size = whole volume, window = the sliding window)
    init_filters: int
    size: tuple[int, int, int]
    window: tuple[int, int, int] | None = None
    device: str = "cpu"
    amp: bool = False  # mixed precision: CUDA only

    @property
    def label(self) -> str:
        window = f" window {'x'.join(map(str, self.window))}" if self.window else ""
        precision = " AMP" if self.amp else ""
        return f"{self.kind} SegResNet-{self.init_filters} {'x'.join(map(str, self.size))}{window}{precision}"


# Training crops from the demo's 32^3 to the paper's 224x224x144 at both widths the project uses; validation of the
# demo's 64x64x48 volumes and of whole BraTS volumes (one window, as the paper; and a smaller window that slides).
POINTS = [
    Point("train", 8, (32, 32, 32)),
    Point("train", 8, (64, 64, 48)),
    Point("train", 8, (96, 96, 64)),
    Point("train", 8, (128, 128, 96)),
    Point("train", 16, (64, 64, 48)),
    Point("train", 16, (96, 96, 64)),
    Point("train", 16, (128, 128, 96)),
    Point("train", 16, (224, 224, 144)),  # the paper's: ~50 s and ~9 GB on 2 CPU threads
    Point("val", 8, (64, 64, 48), (64, 64, 48)),
    Point("val", 16, (64, 64, 48), (64, 64, 48)),
    Point("val", 8, BRATS_VOLUME, PAPER_WINDOW),
    Point("val", 16, BRATS_VOLUME, (128, 128, 96)),
    Point("val", 16, BRATS_VOLUME, PAPER_WINDOW),  # the paper's
]
SMOKE_POINTS = [Point("train", 8, (16, 16, 16)), Point("val", 8, (24, 24, 16), (16, 16, 16))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.memory_points",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", help=f"the CSV to write (default: {OUT.relative_to(REPO_DIR)}; --device cuda: memory_points_cuda.csv)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--smoke", action="store_true", help="2 tiny points, only to check that the benchmark works")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: every point in fp32 and in mixed precision on GPU 0, with its peak GPU memory besides the RSS "
        "(default: cpu)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # one point as JSON: run it in this process
    return p


# ---------------------------------------------------------------------------------------------------------------
# One point, in the child process
# ---------------------------------------------------------------------------------------------------------------
def rss_now_mb() -> float:
    """This process's resident set size now (Linux /proc; 0 where it is not there)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_point(point: Point) -> dict:
    """Do the point's work once; returns seconds, the RSS after the imports and, on CUDA, the peak GPU memory."""
    import torch

    from brats_fl.pipeline import make_loss, predict_regions
    from model import BratsSegResNet

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    after_imports = rss_now_mb()
    device = torch.device(point.device)
    model = BratsSegResNet(init_filters=point.init_filters, init_seed=0).to(device)
    image = torch.randn(1, 4, *point.size, device=device)
    started = time.perf_counter()
    if point.kind == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        label = (torch.rand(1, 3, *point.size, device=device) > 0.9).float()
        with torch.autocast(device_type=device.type, enabled=point.amp):
            loss = make_loss()(model(image), label)
        loss.backward()
        optimizer.step()
    else:
        model.eval()
        predict_regions(model, image, point.window, use_amp=point.amp)
    figures = {"seconds": time.perf_counter() - started, "rss_after_imports_mb": after_imports}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        figures["seconds"] = time.perf_counter() - started
        figures["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        figures["gpu_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return figures


def points_for(device: str, smoke: bool) -> list[Point]:
    """On CUDA every point in fp32 and in mixed precision."""
    chosen = SMOKE_POINTS if smoke else POINTS
    if device == "cpu":
        return chosen
    return [replace(p, device=device, amp=amp) for p in chosen for amp in (False, True)]


# ---------------------------------------------------------------------------------------------------------------
# The parent: one fresh process per point
# ---------------------------------------------------------------------------------------------------------------
def measure(point: Point) -> dict:
    """Run the point in a fresh process; its figures and its peak RSS (os.wait4's ru_maxrss of that child)."""
    spec = json.dumps(asdict(point))
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.memory_points", "--child", spec],
        cwd=REPO_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"error: {point.label} failed (exit {child.returncode})")
    figures = json.loads(out.strip().splitlines()[-1])
    voxels = point.size[0] * point.size[1] * point.size[2]
    window = point.window or point.size
    return {
        "kind": point.kind,
        "init_filters": point.init_filters,
        "size": "x".join(map(str, point.size)),
        "window": "x".join(map(str, point.window)) if point.window else "",
        "voxels": voxels,
        "window_voxels": window[0] * window[1] * window[2],
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "rss_after_imports_mb": round(figures["rss_after_imports_mb"], 1),
        "seconds": round(figures["seconds"], 2),
        "threads": THREADS,
        "device": point.device,
        "amp": point.amp,
        "gpu_peak_allocated_mb": round(figures["gpu_peak_allocated_mb"], 1) if point.device == "cuda" else "",
        "gpu_peak_reserved_mb": round(figures["gpu_peak_reserved_mb"], 1) if point.device == "cuda" else "",
    }


def write_csv(rows: list[dict], path: Path) -> None:
    """Written whole to a temporary file, then renamed: a stopped run leaves no half table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        spec["size"], spec["window"] = tuple(spec["size"]), spec["window"] and tuple(spec["window"])
        point = Point(**spec)
        print(json.dumps(run_point(point)), flush=True)
        return 0
    out = Path(args.out) if args.out else OUT if args.device == "cpu" else OUT.with_name("memory_points_cuda.csv")
    if args.device == "cuda" and not cuda_available():
        print("error: --device cuda: torch sees no CUDA device here", file=sys.stderr)
        return EXIT_BAD_INPUT
    if out.exists() and not args.overwrite:
        print(f"error: --out {out} exists: give --overwrite to replace it, or another --out", file=sys.stderr)
        return EXIT_BAD_INPUT
    points = points_for(args.device, args.smoke)
    where = "fp32 (CPU)" if args.device == "cpu" else f"fp32 and AMP on {gpu_name()}"
    print(f"Peak RSS of {len(points)} points, each in a fresh process, {THREADS} torch threads, {where}")
    print(f"load average before: {load_average()} (seconds are under this load; RSS is not affected by it)")
    print(f"{'point':<56} {'peak RSS MB':>11} {'after imports MB':>16} {'seconds':>8} {'GPU peak MB':>11}", flush=True)
    rows = []
    for point in points:
        row = measure(point)
        rows.append(row)
        print(
            f"{point.label:<56} {row['peak_rss_mb']:>11.1f} {row['rss_after_imports_mb']:>16.1f} "
            f"{row['seconds']:>8.2f} {row['gpu_peak_allocated_mb'] or '-':>11}",
            flush=True,
        )
    write_csv(rows, out)
    print(f"load average after: {load_average()}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
