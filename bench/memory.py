"""Peak CPU memory of each stage of a SANA text-to-image run, one fresh process per stage.

    python -m bench.memory [--dtype fp32] [--sizes 1024,4096] [--dit-depth 2] [--no-write]
    python -m bench.memory --preset sana-1.6b --stages dit     # the larger DiT's stage only

Stages (random weights, the real configs): the Gemma-2-2B text encoder encoding one prompt
with the complex human instruction; one DiT forward with classifier-free guidance (batch 2,
300 caption tokens) at each size; the DC-AE f32c32 decode of one 1024-px tile (the pipeline
decodes larger images tile by tile, 1024-px tiles, so this is the decoder's working set at
any size). Each stage runs in its own process; the table gives its weights and its peak RSS
(process peak, interpreter and torch included).

``--dit-depth N`` runs only the first N DiT blocks at the large sizes: without autograd each
block's activations are freed (or overwritten) before the next block, so the activation peak
of N blocks is that of 28, and the full model's peak is that plus the weights of the blocks
left out (added, and said so in the table). Full depth at 4096 px would take tens of minutes
on a 2-core CPU; the GPU run measures it directly.

The whole pipeline's peak is then: all weights while loading and encoding (the CLI frees the
text encoder after encoding), then DiT + DC-AE weights plus the larger activation peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from bench import measure, models, report
from fastsana.configs import DIT_PRESETS
from fastsana.runtime import configure_threads

GIB = 2**30
STAGES = ("text", "dit", "decode")
# Tokens the text encoder sees for one prompt: SANA's instruction (about 140 Gemma tokens)
# plus the 300-token caption window.
TEXT_WITH_INSTRUCTION = 440


def _weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def stage_text(dtype: torch.dtype) -> dict:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config()  # the defaults are Gemma-2-2B's architecture (2.6 B parameters)
    with torch.device("meta"):
        model = Gemma2Model(config)
    model = model.to_empty(device="cpu").to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # touch every page, as loading real weights does
            p.normal_(0, 0.02)
    # The real tokenizer cannot be downloaded here; only the sequence length matters: the
    # instruction's tokens plus 300 for the prompt.
    ids = torch.randint(config.vocab_size, (1, TEXT_WITH_INSTRUCTION))
    with torch.no_grad(), measure.PeakRSS() as mem:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return {"weights": _weights_bytes(model), "peak": measure.max_rss(), "during": mem.peak_delta}


def stage_dit(dtype: torch.dtype, preset: str, pixels: int, depth: int | None) -> dict:
    full = models.dit_config(preset)
    config = models.dit_config(preset, depth=depth)
    model = models.build_dit(config, "ours", dtype)
    inputs = models.dit_inputs(config, pixels, batch=2)  # CFG: conditional + unconditional
    with torch.no_grad(), measure.PeakRSS() as mem:
        model(inputs.x, inputs.t, inputs.text, inputs.mask)
    weights = _weights_bytes(model)
    left_out = 0
    if config.depth < full.depth:
        per_block = _weights_bytes(model.transformer_blocks[0])
        left_out = per_block * (full.depth - config.depth)
    return {"weights": weights + left_out, "peak": measure.max_rss() + left_out,
            "during": mem.peak_delta, "left_out": left_out}  # fmt: skip


def stage_decode(dtype: torch.dtype, pixels: int) -> dict:
    ae = models.build_dcae(models.ae_config(), "ours", dtype)
    z = torch.randn(1, ae.config.latent_channels, pixels // 32, pixels // 32).to(dtype)
    with torch.no_grad(), measure.PeakRSS() as mem:
        ae.decode(z, tiled=False)
    return {"weights": _weights_bytes(ae), "peak": measure.max_rss(), "during": mem.peak_delta}


def _run_stage(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--stage", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description="peak CPU memory per stage")
    p.add_argument("--dtype", choices=list(models.DTYPES), default="fp32")
    p.add_argument("--preset", choices=list(DIT_PRESETS), default="sana-0.6b", help="the DiT")
    p.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}"
    )
    p.add_argument("--sizes", default="1024,4096")
    p.add_argument("--dit-depth", type=int, default=2, help="blocks run above 1024 px")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)  # internal: one stage
    args = p.parse_args()
    if args.stage:
        name, dtype = args.stage[0], models.DTYPES[args.stage[1]]
        configure_threads()
        if name == "text":
            result = stage_text(dtype)
        elif name == "dit":
            depth = int(args.stage[4]) if args.stage[4] != "full" else None
            result = stage_dit(dtype, args.stage[2], int(args.stage[3]), depth)
        else:
            result = stage_decode(dtype, int(args.stage[2]))
        print(json.dumps(result))
        return

    command = "python -m bench.memory " + " ".join(sys.argv[1:])
    machine = measure.machine_description()
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = args.stages.split(",")
    if not stages or any(s not in STAGES for s in stages):
        p.error(f"--stages: expected a comma-separated selection of {STAGES}, got {args.stages}")
    rows = []
    if "text" in stages:
        rows.append((f"text encoder (Gemma-2-2B), {TEXT_WITH_INSTRUCTION} tokens", "-",
                     _run_stage(["text", args.dtype])))  # fmt: skip
    for px in sizes if "dit" in stages else []:
        depth = "full" if px <= 1024 else str(args.dit_depth)
        rows.append((f"DiT ({args.preset}) forward, CFG batch 2 (depth {depth})", px,
                     _run_stage(["dit", args.dtype, args.preset, str(px), depth])))  # fmt: skip
    if "decode" in stages:
        rows.append(("DC-AE decode of one 1024-px tile", 1024,
                     _run_stage(["decode", args.dtype, "1024"])))  # fmt: skip
    lines = ["| stage | px | weights GiB | peak RSS GiB | of which during the call GiB |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, px, r in rows:
        note = " (blocks left out added)" if r.get("left_out") else ""
        lines.append(f"| {name} | {px} | {r['weights'] / GIB:.2f} | {r['peak'] / GIB:.2f}{note} "
                     f"| {r['during'] / GIB:.2f} |")  # fmt: skip
    body = (f"Command: `{command}`  \nMachine: {report.machine_line(machine)}  \n"
            f"dtype: {args.dtype}\n\n" + "\n".join(lines))  # fmt: skip
    print(body)
    if not args.no_write:
        # The default run keeps its historic block name; any other gets its own block.
        default = (args.preset, stages) == (p.get_default("preset"), list(STAGES))
        name = f"memory-{args.dtype}" + ("" if default else f"-{args.preset}-{'-'.join(stages)}")
        report.write_block(name, body,
                           {"command": command, "machine": machine, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
