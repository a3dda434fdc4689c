"""Speed and memory on this machine, side by side.

    python -m anomaly.bench [--quick] [--only SECTION ...] [--output FILE]

Every figure is the median of several repeats in one process, on the current device (CUDA when
present, else the CPU):

- dense: the machine's own rates, a large matmul and the best of a few large 3x3 convolutions
  (channels_last), the yardstick for the training rate;
- train: images/s of a full training step (forward, loss, backward, optimizer) per model, size
  and memory format (and bf16 autocast), FLOPs per image counted by
  `torch.utils.flop_counter`, the achieved rate as a fraction of the convolution rate, peak memory;
- corrupt: training corruptions, images/s per kind: one image at a time (the loader's path) and
  whole batches (`data.corruption.device=model`), on one CPU thread, and on the GPU when present;
- loader: the DataModule's training loader, images/s with 0, 1 and 2 workers;
- infer: batch-1 latency and batch-32 throughput of the whole prediction pipeline
  (`ImagePipeline`) at 128 and 256 px, through PyTorch and through onnxruntime (CPU);
- metrics: seconds and peak memory to compute every test metric for 132 maps per size.

Writes `bench.json` (or `--output`) and prints one table per section.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from anomaly.data.batch_corruptions import BatchCorruption, texture_bank
from anomaly.data.corruptions import corrupt
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.textures import TextureSource
from anomaly.export import INPUT_NAME, export_onnx, metadata, require
from anomaly.files import write_text
from anomaly.module import compute_stage_metrics, stage_metrics, update_stage_metrics
from anomaly.pipeline import ImagePipeline
from anomaly.tasks import build_detector, build_module

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MODELS = ("sdc_ccm", "residual_ae")
CORRUPTION_KINDS = {"texture": (1.0, 0.0), "elastic": (0.0, 1.0), "both": (0.5, 0.5)}


@dataclass(frozen=True)
class Profile:
    """How much to measure: sizes, batch, repeats."""

    train_sizes: tuple[int, ...] = (128, 256)
    batch: int = 16
    train_steps: int = 5
    corrupt_sizes: tuple[int, ...] = (128, 256)
    corrupt_images: int = 64
    loader_size: int = 128
    loader_workers: tuple[int, ...] = (0, 1, 2)
    loader_batches: int = 12
    infer_sizes: tuple[int, ...] = (128, 256)
    infer_runtimes: tuple[str, ...] = ("pytorch", "onnxruntime")
    infer_repeats: int = 30
    metric_sizes: tuple[int, ...] = (256, 1024)
    metric_images: int = 132
    matmul_side: int = 2048
    conv_side: int = 64
    repeats: int = 3


PROFILES = {
    "full": Profile(),
    "quick": Profile(
        train_sizes=(128,),
        train_steps=2,
        corrupt_sizes=(256,),
        corrupt_images=16,
        loader_workers=(0, 2),
        loader_batches=3,
        infer_sizes=(256,),
        infer_repeats=5,
        metric_sizes=(256,),
        repeats=2,
    ),
    # For the test that keeps this module from rotting: seconds, every figure still present.
    "tiny": Profile(
        train_sizes=(32,),
        batch=2,
        train_steps=1,
        corrupt_sizes=(32,),
        corrupt_images=2,
        loader_size=32,
        loader_workers=(0, 1),
        loader_batches=1,
        infer_sizes=(32,),
        infer_runtimes=("pytorch",),
        infer_repeats=1,
        metric_sizes=(32,),
        metric_images=4,
        matmul_side=128,
        conv_side=16,
        repeats=1,
    ),
}


def median_seconds(work: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `work()` over `repeats` runs after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes() -> int:
    """This process's resident memory (Linux), 0 where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device, result: dict):
    """Peak memory of the block, in MiB, into `result["peak_mib"]`: allocated CUDA memory, or
    on the CPU the resident memory's rise over the block (sampled every 2 ms)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base, peak, done = resident_bytes(), [resident_bytes()], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        result["peak_mib"] = max(peak[0] - base, 0) / 2**20


def dense_rates(device: torch.device, profile: Profile) -> dict:
    """GFLOP/s of a large matmul and the best of a few large 3x3 convolutions."""
    n = profile.matmul_side
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = 2 * n**3 / median_seconds(partial(torch.mm, a, b), profile.repeats, device) / 1e9
    best = 0.0
    side = profile.conv_side
    for channels in (32, 64, 128):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device)
        x = torch.randn(16, channels, side, side, device=device)
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        flops = 2 * 16 * channels * channels * 9 * side * side
        with torch.no_grad():
            seconds = median_seconds(partial(conv, x), profile.repeats, device)
        best = max(best, flops / seconds / 1e9)
    return {"matmul_gflops": matmul, "conv3x3_gflops": best}


def model_config(name: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={name}"]).model


def train_steps(net, loss, optimizer, images, masks, autocast, count: int) -> None:
    """`count` training steps of `net` on one batch."""
    for _ in range(count):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            total, _ = loss(net(images), images, masks)
        total.backward()
        optimizer.step()


def training_rates(device: torch.device, profile: Profile, conv_gflops: float) -> list[dict]:
    """A full training step per model, size and memory format: images/s, FLOPs, peak memory."""
    rows = []
    # bfloat16 autocast as `trainer.precision=bf16-mixed` trains (fast on GPUs and on CPUs with
    # AMX; emulated, slowly, on other CPUs).
    formats = [("fp32", False), ("fp32_channels_last", True), ("bf16_channels_last", True)]
    for name in MODELS:
        for size in profile.train_sizes:
            for label, channels_last in formats:
                module = build_module(model_config(name)).to(device)
                net, loss = module.detector.net.train(), module.loss
                optimizer = module.optimizer(params=net.parameters())
                images = torch.rand(profile.batch, 3, size, size, device=device)
                masks = (torch.rand(profile.batch, 1, size, size, device=device) > 0.9).float()
                layout = torch.channels_last if channels_last else torch.contiguous_format
                net = net.to(memory_format=layout)
                images = images.contiguous(memory_format=layout)
                bf16 = label.startswith("bf16")
                autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

                step = partial(train_steps, net, loss, optimizer, images, masks, autocast)
                counter = FlopCounterMode(display=False)
                with counter:
                    step(1)
                flops = counter.get_total_flops() / profile.batch
                memory: dict = {}
                with peak_memory(device, memory):
                    steps = partial(step, profile.train_steps)
                    seconds = median_seconds(steps, profile.repeats, device)
                rate = profile.batch * profile.train_steps / seconds
                rows.append(
                    {
                        "model": name,
                        "size": size,
                        "format": label,
                        "images_per_s": rate,
                        "gflop_per_image": flops / 1e9,
                        "gflops": rate * flops / 1e9,
                        "fraction_of_conv": rate * flops / 1e9 / conv_gflops,
                        "peak_mib": memory["peak_mib"],
                    }
                )
    return rows


def corrupt_many(images, count: int, textures, probs: tuple[float, float], seed) -> None:
    """`count` per-sample corruptions, cycling through `images`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        corrupt(images[i % len(images)], rng, textures, *probs)


def corrupt_batches(batch: torch.Tensor, count: int, bank, probs: tuple[float, float]) -> None:
    """`count` images corrupted a batch at a time (`count` a multiple of the batch size), as
    the module's batch hook does."""
    corruption = BatchCorruption(bank, 0, 1.0, *probs)
    for i in range(count // len(batch)):
        corruption(batch, torch.arange(len(batch)) + i * len(batch))


def corruption_rates(device: torch.device, profile: Profile) -> list[dict]:
    """Training corruptions, images/s per kind and size: one at a time (numpy/OpenCV, as the
    loader workers run them) and in batches (`data.corruption.device=model`), on one CPU thread,
    and on the GPU when there is one."""
    rows = []
    textures = TextureSource(None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for size in profile.corrupt_sizes:
            rng = np.random.default_rng(0)
            images = [rng.random((size, size, 3), dtype=np.float32) for _ in range(8)]
            # Whole batches: the per-sample path corrupts as many images.
            count = max(profile.batch, profile.corrupt_images // profile.batch * profile.batch)
            batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
            batch = batch.repeat(math.ceil(profile.batch / len(images)), 1, 1, 1)[: profile.batch]
            bank = texture_bank(textures, size, seed=0)
            devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
            for kind, probs in CORRUPTION_KINDS.items():
                seed = [size, len(kind)]
                paths = {
                    ("per_sample", "cpu"): partial(
                        corrupt_many, images, count, textures, probs, seed
                    )
                }
                for target in devices:
                    paths["batched", target.type] = partial(
                        corrupt_batches, batch.to(target), count, bank.to(target), probs
                    )
                for (path, where), work in paths.items():
                    seconds = median_seconds(work, profile.repeats, torch.device(where))
                    # On the CPU one thread: images/s per core.
                    row = {"path": path, "device": where, "size": size, "kind": kind}
                    rows.append(row | {"images_per_s": count / seconds})
    finally:
        torch.set_num_threads(threads)
    return rows


def loader_rates(profile: Profile) -> list[dict]:
    """The training loader of the built-in set (Model II's corruptions), images/s per worker
    count, over whole passes of `loader_batches` batches."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for workers in profile.loader_workers:
            datamodule = AnomalyDataModule(
                root=folder,
                image_size=profile.loader_size,
                batch_size=profile.batch,
                num_workers=workers,
                corruption=dict(model_config("sdc_ccm").objective.corruption),
                synthetic={"seed": 0, "size": profile.loader_size},
            )
            datamodule.prepare_data()
            datamodule.setup("fit")

            def work(datamodule=datamodule):
                for i, _ in enumerate(datamodule.train_dataloader()):
                    if i + 1 == profile.loader_batches:
                        break

            seconds = median_seconds(work, profile.repeats, torch.device("cpu"))
            rows.append(
                {
                    "workers": workers,
                    "size": profile.loader_size,
                    "images_per_s": profile.loader_batches * profile.batch / seconds,
                }
            )
    return rows


def inference_pipeline(name: str, size: int, device: torch.device) -> ImagePipeline:
    """A model's untrained `ImagePipeline` at `size`, standardizing as a trained one does."""
    detector = build_detector(model_config(name))
    detector.set_normal_statistics(torch.zeros(size, size), torch.ones(size, size))
    detector.set_threshold(1.0, 0.0)
    # In the layout the Lightning module trains and evaluates in (`model.channels_last`).
    detector.net.to(memory_format=torch.channels_last)
    return ImagePipeline(detector, (size, size)).to(device).eval()


def inference_runtimes(pipeline: ImagePipeline, device: torch.device, profile: Profile, folder):
    """(runtime name, run(uint8 images as numpy)) for PyTorch and, on the CPU, onnxruntime."""

    def torch_run(images: np.ndarray):
        with torch.inference_mode():
            return pipeline(torch.from_numpy(images).to(device))

    yield "pytorch", torch_run
    if "onnxruntime" not in profile.infer_runtimes or device.type != "cpu":
        return
    path = Path(folder) / "model.onnx"
    export_onnx(pipeline, path, metadata(pipeline, "bench", "none"))
    session = require("onnxruntime").InferenceSession(str(path), providers=["CPUExecutionProvider"])
    yield "onnxruntime", lambda images: session.run(None, {INPUT_NAME: images})


def inference_rates(device: torch.device, profile: Profile) -> list[dict]:
    """The whole prediction pipeline (resize, network, map, score, verdict) of uint8 images at
    the model's size: batch-1 latency and batch-32 throughput, per model, size and runtime."""
    rows = []
    for name, size in ((name, size) for name in MODELS for size in profile.infer_sizes):
        pipeline = inference_pipeline(name, size, device)
        rng = np.random.default_rng(0)
        one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        many = rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as folder:
            for runtime, run in inference_runtimes(pipeline, device, profile, folder):
                latency = median_seconds(partial(run, one), profile.infer_repeats, device)
                batch = median_seconds(partial(run, many), profile.repeats, device)
                rows.append(
                    {
                        "model": name,
                        "size": size,
                        "runtime": runtime,
                        "latency_ms_batch1": 1000 * latency,
                        "images_per_s_batch32": 32 / batch,
                    }
                )
    return rows


def compute_test_metrics(maps, masks, scores, labels, device: torch.device) -> dict:
    """Every test metric of maps (N, H, W), masks, scores (N,) and labels, fed 32 at a time."""
    metrics = stage_metrics(None, 2.0, test=True).to(device)
    for start in range(0, len(maps), 32):
        part = slice(start, start + 32)
        update_stage_metrics(
            metrics,
            maps[part].to(device),
            masks[part].to(device),
            scores[part].to(device),
            labels[part].to(device),
        )
    return {key: float(value) for key, value in compute_stage_metrics(metrics).items()}


def metric_inputs(count: int, size: int) -> tuple:
    """Maps (N, H, W), masks, scores (N,) and labels of a test set: half of it defective."""
    generator = torch.Generator().manual_seed(size)
    maps = torch.rand(count, size, size, generator=generator)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    masks[count // 2 :, size // 4 : size // 2, size // 4 : size // 2] = 1
    labels = (torch.arange(count) >= count // 2).long()
    maps[masks.bool()] += 0.3
    return maps, masks, maps.flatten(1).amax(1), labels


def metric_peak_mib(count: int, size: int) -> float:
    """The rise of resident memory while computing the test metrics once, in a fresh process
    (in this one, memory freed by earlier sections is reused without showing)."""
    inputs, memory = metric_inputs(count, size), {}
    # Sampled: the kernel's own peak (ru_maxrss) survives the exec from a larger parent.
    with peak_memory(torch.device("cpu"), memory):
        compute_test_metrics(*inputs, torch.device("cpu"))
    return memory["peak_mib"]


def metric_rates(device: torch.device, profile: Profile) -> list[dict]:
    """Every test metric (image and pixel AUROC, AUPRO, F1-max) for `metric_images` maps."""
    rows = []
    for size in profile.metric_sizes:
        count = profile.metric_images
        work = partial(compute_test_metrics, *metric_inputs(count, size), device)
        memory: dict = {}
        if device.type == "cuda":
            with peak_memory(device, memory):
                seconds = median_seconds(work, profile.repeats, device)
        else:
            seconds = median_seconds(work, profile.repeats, device)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                memory["peak_mib"] = pool.apply(metric_peak_mib, (count, size))
        rows.append(
            {"images": count, "size": size, "seconds": seconds, "peak_mib": memory["peak_mib"]}
        )
    return rows


SECTIONS = ("dense", "train", "corrupt", "loader", "infer", "metrics")


def run_bench(profile: Profile, device: torch.device, sections: tuple[str, ...] = SECTIONS) -> dict:
    """The figures of `sections` (all by default), as written to bench.json."""
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    dense = dense_rates(device, profile) if {"dense", "train"} & set(sections) else {}
    measures = {
        "dense": lambda: dense,
        "train": lambda: training_rates(device, profile, dense["conv3x3_gflops"]),
        "corrupt": lambda: corruption_rates(device, profile),
        "loader": lambda: loader_rates(profile),
        "infer": lambda: inference_rates(device, profile),
        "metrics": lambda: metric_rates(device, profile),
    }
    return results | {section: measures[section]() for section in SECTIONS if section in sections}


def format_table(rows: list[dict]) -> str:
    """Rows of one section as an aligned text table."""
    if isinstance(rows, dict):
        rows = [rows]
    header = list(rows[0])

    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[cell(row[key]) for key in header] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomaly.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (< 2 min)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help=argparse.SUPPRESS)
    parser.add_argument("--output", default="bench.json", help="where to write the figures")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="measure these sections"
    )
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile or ("quick" if args.quick else "full")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = run_bench(profile, device, tuple(args.only))
    print(f"device {results['device']}, {results['threads']} threads, torch {results['torch']}")
    for section in (section for section in SECTIONS if section in results):
        print(f"\n[{section}]\n{format_table(results[section])}")
    write_text(args.output, json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
