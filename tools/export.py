#!/usr/bin/env python
"""Export an APT backbone to an AOTInductor package (.pt2) and/or an ONNX model (.onnx).

    python tools/export.py --host eva02_b_det --size 1024 --setting detection --output-dir exports
    python tools/export.py --host vitdet_b --size 1024 --thresholds '{"32": 2}' --formats onnx --check
    python tools/export.py --host sam_vit_b --checkpoint sam_vit_b_01ec64.pth --output-dir exports   # SAM's encoder + neck
    python tools/export.py --host eva02_b_seg --size 512 --benchmark       # exported APT vs exported dense, side by side

One file serves every batch size, every image content and every threshold setting at the
exported image size (the runners take ``thresholds=`` per call). ``--dense`` exports the same
model with adaptive patching off. ``--check`` runs every file against the eager model on the
sample photos and crops of them (batches of 1 and 2, the export's thresholds and merging off)
and fails on any difference beyond 1e-4 (with ``--benchmark``: the APT files, before timing).
``--benchmark`` exports the APT model and the dense
model with the same weights, times both per format on the sample photos (one image per call,
alternating, after a warm-up; merging off through the APT file's thresholds input, then the
given thresholds), and writes ``<output-dir>/export-<host>-<size>-cpu-fp32.{json,md}``
(default ``benchmarks/results``), with the ideal (FLOP ratio) and the machine's load average.
AOTInductor compiles C++: minutes per full-size backbone on a small CPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apt_dense.benchmarking import (
    backbone_flops, host_planner, model_builder, non_negative_int, output_path, positive_int, same_weights_pair, thresholds_json,
    time_side_by_side,
)
from apt_dense.checkpoints import UnsafeCheckpointError, load_state_dict_checked, read_checkpoint, unwrap_state_dict
from apt_dense.export import eager_output, export_program, load_runner, save_aoti, save_onnx
from apt_dense.outputs import atomic_write, check_output_folder, write_error
from apt_dense.presets import APT_SETTINGS, HOSTS, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from apt_dense.sample_images import letterbox, load_sample_photos, normalise

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"aoti": (".pt2", save_aoti), "onnx": (".onnx", save_onnx)}
TOL = dict(atol=1e-4, rtol=1e-4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="eva02_b_det", choices=sorted(HOSTS), help="architecture preset (sam_*: SAM's encoder with its neck)")
    p.add_argument("--size", type=positive_int, default=None, help="square image size (default: the host's img_size)")
    p.add_argument("--depth", type=positive_int, default=None, help="fewer blocks (quick runs, random weights)")
    p.add_argument("--setting", default=None, choices=sorted(APT_SETTINGS),
                   help="the paper's thresholds (default: detection, segmentation for *_seg, sam for sam_*)")
    p.add_argument("--thresholds", type=thresholds_json, default=None, help='JSON like \'{"32": 2, "64": 2, "128": 0.3}\'')
    p.add_argument("--dense", action="store_true", help="export with adaptive patching off")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (default: random, seed 0)")
    p.add_argument("--checkpoint-prefix", default="", help="load the keys under this prefix, e.g. backbone.net.")
    p.add_argument("--unsafe-load", action="store_true", help="read a trusted checkpoint that holds other pickled objects")
    p.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=sorted(FORMATS))
    p.add_argument("--max-batch", type=positive_int, default=None, help="the largest batch the files accept (default: any)")
    p.add_argument("--output-dir", type=output_path, default=None,
                   help="where the files go (default exports/; with --benchmark, the results: benchmarks/results)")
    p.add_argument("--name", default=None, help="file name stem (default <host>-<size>[-dense])")
    p.add_argument("--check", action="store_true",
                   help="compare every file with the eager model on the sample photos (with --benchmark: the APT files)")
    p.add_argument("--benchmark", action="store_true", help="exported APT vs exported dense, per format")
    p.add_argument("--exports", type=output_path, default=None,
                   help="--benchmark: folder for the exported files (default: a temporary one); existing files are reused")
    p.add_argument("--repeats", type=positive_int, default=3, help="--benchmark: timed calls per image and side")
    p.add_argument("--limit", type=positive_int, default=None, help="--benchmark: time at most this many photos")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="--benchmark: untimed calls per image and side")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch and ONNX Runtime; default: torch's)")
    args = p.parse_args(argv)
    if args.max_batch is not None and args.max_batch < 2:
        p.error("--max-batch must be at least 2 (or left out)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    if args.benchmark and args.dense:
        p.error("--benchmark exports the dense model itself; drop --dense")
    if args.host.startswith("sam_") and args.size not in (None, HOSTS[args.host]["img_size"]):
        p.error(f"SAM's image encoder runs at {HOSTS[args.host]['img_size']} px; drop --size")
    args.size = args.size or HOSTS[args.host]["img_size"]
    args.setting = args.setting or ("sam" if args.host.startswith("sam_") else
                                    "segmentation" if args.host.endswith("_seg") else "detection")
    if args.name is not None and (not args.name.strip() or Path(args.name).name != args.name):
        p.error(f"--name {args.name!r}: a file name stem without folders; put the folder in --output-dir")
    args.output_dir = args.output_dir or ROOT / ("benchmarks/results" if args.benchmark else "exports")
    try:  # where the files go, and thresholds that fit the host's windows and the size, before any work
        check_output_folder(args.output_dir, what="--output-dir")
        if args.exports is not None:
            check_output_folder(args.exports, what="--exports")
        host_planner(args.host, thresholds_of(args), img_size=args.size, depth=args.depth)
    except ValueError as err:
        p.error(str(err))
    return args


def thresholds_of(args) -> dict[int, float]:
    return args.thresholds or APT_SETTINGS[args.setting]


def build_pair(args):
    """``(apt, dense)`` with the same weights (the checkpoint's, or random ones), eval mode."""
    thresholds = thresholds_of(args)
    if args.host.startswith("sam_"):
        from apt_dense.sam import build_apt_sam

        def build(adaptive: bool):
            return build_apt_sam(args.host[len("sam_"):], args.checkpoint, thresholds=thresholds, depth=args.depth,
                                 allow_pickle=args.unsafe_load, adaptive=adaptive).image_encoder
    else:
        overrides = dict(img_size=args.size, pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD)
        if args.depth is not None:
            overrides["depth"] = args.depth
        host_build = model_builder(args.host, thresholds, **overrides)

        def build(adaptive: bool):
            model = host_build(adaptive)
            if args.checkpoint is not None:
                load_backbone_checkpoint(model, args)
            return model
    return same_weights_pair(build)


def load_backbone_checkpoint(model, args) -> None:
    state = unwrap_state_dict(read_checkpoint(args.checkpoint, allow_pickle=args.unsafe_load))
    prefix = args.checkpoint_prefix
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise SystemExit(f"error: {args.checkpoint} has no keys under the prefix {prefix!r}; set --checkpoint-prefix")
    missing, unexpected = load_state_dict_checked(model, state)
    if unexpected:
        print(f"{args.checkpoint}: {len(unexpected)} keys not used, e.g. {unexpected[:3]}")


def sample_images(size: int, crops: bool = False) -> tuple[list[str], torch.Tensor]:
    """Names and normalised letterboxed canvases of the sample photos (and of 60% crops of them)."""
    photos = load_sample_photos()
    if crops:
        for name, photo in list(photos.items()):
            h, w = photo.shape[:2]
            photos[f"{name} crop"] = np.ascontiguousarray(photo[: h * 3 // 5, : w * 3 // 5])
    raw = torch.stack([letterbox(photo, size, IMAGENET_PIXEL_MEAN)[0] for photo in photos.values()])
    return list(photos), normalise(raw, IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD)


def export_files(model, args, folder: Path, stem: str, reuse: bool = False) -> dict[str, Path]:
    """``{format: path}`` of ``model`` exported once and written in each format."""
    paths = {fmt: folder / f"{stem}{FORMATS[fmt][0]}" for fmt in args.formats}
    todo = [fmt for fmt, path in paths.items() if not (reuse and path.is_file())]
    if todo:
        start = time.perf_counter()
        program, spec = export_program(model, (args.size, args.size), max_batch=args.max_batch)
        print(f"{stem}: torch.export {time.perf_counter() - start:.0f} s")
        for fmt in todo:
            start = time.perf_counter()
            try:
                FORMATS[fmt][1](program, spec, paths[fmt])
            except BaseException:  # a full disk or Ctrl-C: no partial package or model is left
                paths[fmt].unlink(missing_ok=True)
                raise
            size = paths[fmt].stat().st_size / 2**20
            print(f"{stem}: {paths[fmt]} ({size:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    return paths


def runner_kwargs(fmt: str, args) -> dict:
    return {"threads": args.threads} if fmt == "onnx" and args.threads else {}


def check(model, paths: dict[str, Path], args) -> bool:
    """Every file against eager on the sample photos and crops, batches of 1 and 2."""
    _, images = sample_images(args.size, crops=True)
    batches = [images[i : i + 1 + i % 2] for i in range(0, len(images), 2)]
    settings = [None] + ([{s: 0.0 for s in model.planner.schedule.threshold_map()}] if model.planner.merges else [])
    ok = True
    for fmt, path in paths.items():
        runner = load_runner(path, **runner_kwargs(fmt, args))
        worst, tokens = 0.0, []
        for thresholds in settings:
            for x in batches:
                want = eager_output(model, x, thresholds)
                got = runner(x, thresholds)
                same_tokens = got.tokens_per_image.tolist() == want.tokens_per_image.tolist()
                tokens += want.tokens_per_image.tolist()
                for name, value in want.outputs.items():
                    worst = max(worst, float((got.outputs[name] - value).abs().max()))
                    close = torch.allclose(got.outputs[name], value, **TOL)
                    ok &= close and same_tokens
        print(f"check {path.name}: {len(batches) * len(settings)} batches (sizes 1 and 2, {len(settings)} threshold "
              f"settings), tokens {min(tokens)}..{max(tokens)}, max |difference| {worst:.2e}: "
              f"{'equal to 1e-4' if ok else 'DIFFERENT'}")
    return ok


def load_average() -> float:
    return os.getloadavg()[0]


def benchmark(args, apt, dense) -> int:
    names, images = sample_images(args.size)
    names, images = names[: args.limit], images[: args.limit]
    folder = args.exports or Path(os.environ.get("TMPDIR", "/tmp")) / f"apt-export-{args.host}-{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{args.host}-{args.size}" + (f"-d{args.depth}" if args.depth else "")
    files = {"apt": export_files(apt, args, folder, stem, reuse=args.exports is not None),
             "dense": export_files(dense, args, folder, stem + "-dense", reuse=args.exports is not None)}
    off = {size: 0.0 for size in thresholds_of(args)}
    apt_layouts = [apt.planner(x[None]) for x in images]
    dense_layouts = [dense.planner(x[None]) for x in images]
    dense_flops = sum(backbone_flops(apt, layout) for layout in dense_layouts)
    if args.check and not check(apt, files["apt"], args):
        return 1
    rows = []
    for fmt in args.formats:
        runners = {side: load_runner(files[side][fmt], **runner_kwargs(fmt, args)) for side in ("apt", "dense")}
        for label, thresholds, kept_layouts in (("merging off", off, dense_layouts), ("paper", None, apt_layouts)):
            load_before = load_average()
            seconds = {"dense": 0.0, "apt": 0.0}
            for x in images:
                x = x[None]
                calls = {"dense": lambda x=x: runners["dense"](x), "apt": lambda x=x: runners["apt"](x, thresholds)}
                for side, value in time_side_by_side(calls, torch.device("cpu"), args.warmup, args.repeats).items():
                    seconds[side] += value
            kept = np.array([layout.mean_kept_fraction for layout in kept_layouts])
            ideal = dense_flops / sum(backbone_flops(apt, layout) for layout in kept_layouts)
            speedup = seconds["dense"] / seconds["apt"]
            rows.append(dict(
                format=fmt, setting=label, thresholds={str(k): v for k, v in (thresholds or thresholds_of(args)).items()},
                kept_mean=float(kept.mean()), kept_min=float(kept.min()), kept_max=float(kept.max()),
                dense_img_s=len(images) / seconds["dense"], apt_img_s=len(images) / seconds["apt"], speedup=speedup,
                ideal_speedup=ideal, achieved_over_ideal=speedup / ideal, load_before=load_before, load_after=load_average(),
            ))
            r = rows[-1]
            print(f"{fmt} {label}: kept {r['kept_mean']:.1%}, dense {r['dense_img_s']:.3f} img/s, APT "
                  f"{r['apt_img_s']:.3f} img/s, {speedup:.2f}x of ideal {ideal:.2f}x ({speedup / ideal:.2f}); "
                  f"load {r['load_before']:.1f} -> {r['load_after']:.1f}", flush=True)
    write_results(args, names, rows)
    return 0


def write_results(args, names: list[str], rows: list[dict]) -> None:
    import onnxruntime

    stem = args.output_dir / (f"export-{args.host}-{args.size}" + (f"-d{args.depth}" if args.depth else "") + "-cpu-fp32")
    env = dict(date=dt.datetime.now().isoformat(timespec="seconds"), device=f"{platform.machine()} CPU",
               cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
               onnxruntime=onnxruntime.__version__, images=names)
    with atomic_write(stem.with_suffix(".json"), "w") as f:
        json.dump(dict(environment=env, args={k: str(v) for k, v in vars(args).items()}, rows=rows), f, indent=1)
    lines = [
        f"{env['device']} ({env['threads']} threads), torch {env['torch']}, onnxruntime {env['onnxruntime']}, fp32, "
        f"{args.host} at {args.size}, {len(names)} images one at a time, {env['date']}",
        "",
        "| format | thresholds | tokens kept mean (min-max) | dense img/s | APT img/s | speedup | ideal | achieved/ideal | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['setting']} {json.dumps(r['thresholds'])} | {r['kept_mean']:.1%} "
            f"({r['kept_min']:.1%}-{r['kept_max']:.1%}) | {r['dense_img_s']:.3f} | {r['apt_img_s']:.3f} | "
            f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['achieved_over_ideal']:.2f} | "
            f"{r['load_before']:.1f}-{r['load_after']:.1f} |"
        )
    with atomic_write(stem.with_suffix(".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json, .md")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        apt, dense = build_pair(args)
    except (OSError, ValueError, TypeError, UnsafeCheckpointError) as err:  # the checkpoint does not fit or load
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        if args.benchmark:
            return benchmark(args, apt, dense)
        model = dense if args.dense else apt
        stem = args.name or f"{args.host}-{args.size}" + ("-dense" if args.dense else "")
        paths = export_files(model, args, args.output_dir, stem)
    except OSError as err:  # a full disk or a folder that became unwritable: no partial file is left
        print(f"error: {write_error(err)}", file=sys.stderr)
        return 1
    if args.check and not check(model, paths, args):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
