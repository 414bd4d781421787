"""Command line of the benchmarks; see ``python -m bench --help``."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from tqdm.auto import tqdm

from bench import measure, models, report
from bench.pipeline_run import COMPILE_MODES
from fastsana.runtime import configure_threads


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes must be comma-separated ints, got {text!r}"
        ) from None
    bad = [s for s in sizes if s < 32 or s % 32]
    if not sizes or bad:
        raise argparse.ArgumentTypeError(f"--sizes must be multiples of 32 px, got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="ours vs diffusers, side by side")
    c.add_argument("--what", choices=["dit", "dcae", "pipeline", "all"], default="dit")
    c.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--dtype", choices=list(models.DTYPES), default="bf16")
    c.add_argument("--models", default="sana-0.6b", help=f"comma list of {models.DIT_MODELS}")
    c.add_argument("--sizes", type=_sizes, default=[512, 1024], help="DiT sizes in px")
    c.add_argument("--ae-sizes", type=_sizes, default=[512, 1024], help="DC-AE sizes in px")
    c.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
    c.add_argument("--depth", type=int, default=None, help="run only the first N DiT blocks")
    c.add_argument("--pipeline-px", type=int, default=1024)
    c.add_argument("--steps", type=int, default=20, help="pipeline steps (CFG, batch 2)")
    c.add_argument("--batch", type=int, default=1, help="pipeline images per run")
    c.add_argument("--pipeline-repeats", type=int, default=1, help="timed pipeline runs")
    c.add_argument(
        "--pipeline-compile",
        choices=COMPILE_MODES,
        default="none",
        help="torch.compile every DiT block of both pipelines (see bench/pipeline_run.py)",
    )
    c.add_argument(
        "--pipeline-vae-channels-last",
        action="store_true",
        help="both pipelines' decoders with channels-last (NHWC) weights",
    )
    c.add_argument("--compile", action="store_true", help="torch.compile our DiT (timed after)")
    c.add_argument("--name", default=None, help="block name in docs/benchmarks.md")
    c.add_argument("--no-write", action="store_true", help="print only")

    s = sub.add_parser("scaling", help="time vs resolution, linear vs softmax attention")
    s.add_argument("--depth", type=int, default=2)
    s.add_argument("--dtype", choices=list(models.DTYPES), default="fp32")
    s.add_argument("--budget", type=float, default=60.0, help="max seconds per softmax call")
    s.add_argument("--no-write", action="store_true")
    s.add_argument("--replot", action="store_true", help="redraw the plot from benchmarks.json")

    f = sub.add_parser("profile", help="where the DiT forward spends its time")
    f.add_argument("--model", default="sana-0.6b")
    f.add_argument("--dtype", choices=list(models.DTYPES), default="bf16")
    f.add_argument("--size", type=int, default=1024)
    f.add_argument("--depth", type=int, default=None)
    f.add_argument("--impls", default="ours,diffusers")
    f.add_argument("--no-write", action="store_true")

    for sp in (c, s, f):
        sp.add_argument("--threads", type=int, default=None, help="default: physical cores")
    return p


def _check_device(device: str, dtype: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if device == "cpu" and dtype == "fp16":
        raise SystemExit("--dtype fp16 is for CUDA; on CPU use fp32 or bf16")


def cmd_compare(args: argparse.Namespace, command: str) -> None:
    _check_device(args.device, args.dtype)
    machine = measure.machine_description(args.device)
    print(report.machine_line(machine))
    peak_dtypes = ("fp32", "bf16") + (("fp16",) if args.device == "cuda" else ())
    peaks = {
        name: measure.gemm_peak(models.DTYPES[name], device=args.device) for name in peak_dtypes
    }
    print(report.peaks_line(peaks))
    what = ["dit", "dcae", "pipeline"] if args.what == "all" else [args.what]
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in models.DIT_MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {models.DIT_MODELS}")
    rows = []
    log = tqdm.write
    if "dit" in what:
        from bench.compare import compare_dit

        for name in names:
            rows += compare_dit(
                name, args.dtype, args.sizes, args.repeats, args.depth, log, args.compile,
                args.device,
            )  # fmt: skip
    if "dcae" in what:
        from bench.compare import compare_dcae

        rows += compare_dcae(args.dtype, args.ae_sizes, args.repeats, log, args.device)
    if "pipeline" in what:  # long: last
        from bench.compare import compare_pipeline

        rows.append(
            compare_pipeline(
                names[0],
                args.dtype,
                args.pipeline_px,
                args.steps,
                log,
                args.device,
                args.batch,
                args.pipeline_repeats,
                args.pipeline_compile,
                args.pipeline_vae_channels_last,
            )
        )
    body = (
        f"Command: `{command}`  \nMachine: {report.machine_line(machine)}  \n"
        f"{report.peaks_line(peaks)}\n\n{report.compare_table(rows, peaks)}"
    )
    print(body)
    if not args.no_write:
        suffix = "" if args.device == "cpu" else f"-{args.device}"
        name = args.name or f"compare-{args.what}-{args.dtype}{suffix}"
        report.write_block(name, body, {"command": command, "machine": machine, "peaks": peaks,
                                        "rows": report.rows_record(rows)})  # fmt: skip


def cmd_scaling(args: argparse.Namespace, command: str) -> None:
    from bench import scaling

    if args.replot:
        import json

        scaling.plot(json.loads(report.JSON_PATH.read_text())["scaling"]["results"])
        return
    machine = measure.machine_description()
    results = scaling.run_scaling(args.depth, args.dtype, args.budget, tqdm.write)
    body = (
        f"Command: `{command}`  \nMachine: {report.machine_line(machine)}\n\n"
        f"{scaling.table(results)}\n![DiT scaling](img/dit_scaling.png)\n"
    )
    print(body)
    if not args.no_write:
        scaling.plot(results)
        report.write_block("scaling", body, {"command": command, "machine": machine,
                                             "depth": args.depth, "results": results})  # fmt: skip


def cmd_profile(args: argparse.Namespace, command: str) -> None:
    from bench import profile_dit

    machine = measure.machine_description()
    impls = tuple(i for i in args.impls.split(",") if i)
    result = profile_dit.run_profile(args.model, args.dtype, args.size, args.depth, impls)
    body = (
        f"Command: `{command}`  \nMachine: {report.machine_line(machine)}\n\n"
        f"{profile_dit.table(result)}"
    )
    print(body)
    if not args.no_write:
        name = f"profile-{args.model}-{args.dtype}-{args.size}"
        report.write_block(name, body, {"command": command, "machine": machine, **result})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    configure_threads(args.threads)
    command = "python -m bench " + shlex.join(argv)
    {"compare": cmd_compare, "scaling": cmd_scaling, "profile": cmd_profile}[args.command](
        args, command
    )


if __name__ == "__main__":
    main()
