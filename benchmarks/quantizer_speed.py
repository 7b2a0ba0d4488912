"""Quantizer speed: training steps and encoding (pairs/s) of the current model against the old path (the network as
it was before issue 15, `benchmarks/quantizer_baseline.py`), measured in the same process on the same weights and
batch, the paths' calls rotated and the median kept. Prints a table and writes JSON.

    python benchmarks/quantizer_speed.py                         # tiny + mid, fp32 and bf16
    python benchmarks/quantizer_speed.py --presets tiny --repeats 10 --compile

Paths (training): `old` (fp32, the old network), `new` (fp32), `new bf16` (the same step under bf16 autocast, as
`train_quantizer.py --mixed-precision bf16` runs it) and, with `--compile`, `new compiled` / `new bf16 compiled`
(the transformer stacks through torch.compile, as `--compile`; the compilation is in `first_call_seconds`).
Each path trains its own copy of the same initial weights with Adam and clipping, as `train_quantizer.py` does.
Paths (encoding, eval mode): `old` and `new`. `--threads 1` shows the paths without intra-op thread waits: on 2 cores
shared with other work those waits, not the arithmetic, can decide the ratios (see the README).

Checks: `loss/grad rel` is the relative difference of the first step's loss and gradient (all parameters as one
vector) against the old path's, same weights and noise; `numbers==` says they are within fp32 noise (loss 1e-5,
gradient 1e-4) for the fp32 paths. For encoding, `codes==` compares the codes and `latents` says whether the latents
are bitwise equal. Peak memory is the peak resident set size of one step above the level before it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.common import PeakRSS, write_report
from benchmarks.quantizer_baseline import reference_encode, reference_forward, reference_latents
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel

PRESETS = {
    # the training preset's model (per-slot codebooks, as `train_quantizer.py --preset tiny` builds it), batch 32
    "tiny": dict(config=dict(preset="tiny", codebook_per_slot=True, replacement_noise=0.1, replacement_min_share=0.03),
                 batch=32, repeats=8),
    # width 256 at 128 px (16 px patches: the same 8 x 8 grid), depths 4/4, 8 heads of 32
    "mid": dict(config=dict(hidden_size=256, image_size=128, patch_size=16, spatial_depth=4, temporal_depth=4,
                            num_heads=8, head_dim=32), batch=16, repeats=5),
    "reference": dict(config=dict(preset="reference"), batch=2, repeats=2),
}
STACKS = ("encoder_spatial", "encoder_temporal", "decoder_spatial")


def build_config(preset: str) -> LAPAQuantizerConfig:
    settings = dict(PRESETS[preset]["config"])
    name = settings.pop("preset", None)
    return LAPAQuantizerConfig.from_preset(name, **settings) if name else LAPAQuantizerConfig(**settings)


def training_step(model, pairs, *, old: bool, bf16: bool):
    """One optimizer step of `model` (its own Adam), as train_quantizer.py takes it; returns step(i) -> loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))

    def step(i: int) -> float:
        torch.manual_seed(i)  # the same NSVQ noise on every path
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = reference_forward(model, pairs, step=i) if old else model(pairs, step=i)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def loss_and_gradient(model, pairs, *, old: bool, bf16: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = reference_forward(model, pairs, step=1) if old else model(pairs, step=1)
    out.loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return out.loss.item(), gradient


def rotated_medians(functions: dict, repeats: int, first_step: int) -> dict[str, float]:
    """Median seconds of each function, called in rotated order `repeats` times."""
    names, times = list(functions), {name: [] for name in functions}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            functions[name](first_step + r)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_training(preset: str, config, pairs, repeats: int, compile_paths: bool) -> list[dict]:
    torch.manual_seed(0)
    initial = LAPAQuantizerModel(config).train()
    paths = {"old": dict(old=True, bf16=False), "new": dict(old=False, bf16=False),
             "new bf16": dict(old=False, bf16=True)}
    if compile_paths:
        paths.update({"new compiled": dict(old=False, bf16=False, compiled=True),
                      "new bf16 compiled": dict(old=False, bf16=True, compiled=True)})
    models, steps, compile_seconds, checks = {}, {}, {}, {}
    old_loss, old_gradient = loss_and_gradient(initial, pairs, old=True, bf16=False)
    for name, path in paths.items():
        model = copy.deepcopy(initial)
        if path.get("compiled"):
            for stack in STACKS:
                getattr(model, stack).compile()
        start = time.perf_counter()
        loss, gradient = loss_and_gradient(model, pairs, old=path["old"], bf16=path["bf16"])
        compile_seconds[name] = time.perf_counter() - start  # the first call: with a compiled path's compilation
        checks[name] = (abs(loss - old_loss) / abs(old_loss),
                        float((gradient - old_gradient).norm() / old_gradient.norm()))
        models[name] = model
        steps[name] = training_step(model, pairs, old=path["old"], bf16=path["bf16"])
        steps[name](1)  # warm-up
    medians = rotated_medians(steps, repeats, first_step=2)
    rows = []
    for name, path in paths.items():
        with PeakRSS() as memory:
            steps[name](100)
        loss_rel, grad_rel = checks[name]
        rows.append(dict(
            preset=preset, phase="train", path=name, batch_size=pairs.shape[0], repeats=repeats,
            seconds=medians[name], pairs_per_s=pairs.shape[0] / medians[name],
            speedup_vs_old=medians["old"] / medians[name], peak_mib=memory.mib,
            loss_rel_diff=loss_rel, grad_rel_diff=grad_rel,
            numbers_equal=None if path["bf16"] else bool(loss_rel <= 1e-5 and grad_rel <= 1e-4),
            first_call_seconds=compile_seconds[name],
        ))
    return rows


def bench_encoding(preset: str, config, pairs, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = LAPAQuantizerModel(config).eval()
    with torch.inference_mode():
        old = reference_encode(model, pairs)
        new = model.encode(pairs)
        latents_equal = torch.equal(new.latents.reshape(-1, config.quant_dim), reference_latents(model, pairs))
        functions = {"old": lambda _: reference_encode(model, pairs), "new": lambda _: model.encode(pairs)}
        functions["old"](0), functions["new"](0)
        medians = rotated_medians(functions, repeats, first_step=0)
    rows = []
    for name in functions:
        rows.append(dict(
            preset=preset, phase="encode", path=name, batch_size=pairs.shape[0], repeats=repeats,
            seconds=medians[name], pairs_per_s=pairs.shape[0] / medians[name],
            speedup_vs_old=medians["old"] / medians[name],
            codes_equal=bool(torch.equal(old, new.codes)), latents_bitwise_equal=bool(latents_equal),
        ))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"], choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny 32, mid 16, reference 2")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per path (default: per preset)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also the torch.compile paths (minutes of compiling)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default="benchmarks/results/quantizer_speed.json")
    return parser


def print_table(rows: list[dict]) -> None:
    header = (f"{'preset':9s} {'phase':6s} {'path':18s} {'batch':>5s} {'pairs/s':>9s} {'x old':>6s} {'MiB':>6s} "
              f"{'loss rel':>9s} {'grad rel':>9s} {'check':>18s}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        if r["phase"] == "train":
            check = {True: "numbers== True", False: "numbers== FALSE", None: "(bf16: see rel)"}[r["numbers_equal"]]
            extra = f"{r['peak_mib']:6.0f} {r['loss_rel_diff']:9.1e} {r['grad_rel_diff']:9.1e}"
        else:
            check = f"codes== {r['codes_equal']}, bitwise {r['latents_bitwise_equal']}"
            extra = f"{'':6s} {'':9s} {'':9s}"
        print(f"{r['preset']:9s} {r['phase']:6s} {r['path']:18s} {r['batch_size']:5d} {r['pairs_per_s']:9.2f} "
              f"{r['speedup_vs_old']:6.2f} {extra} {check:>18s}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        config = build_config(preset)
        batch = args.batch_size or PRESETS[preset]["batch"]
        repeats = args.repeats or PRESETS[preset]["repeats"]
        pairs = torch.rand(batch, 2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
        rows += bench_training(preset, config, pairs, repeats, args.compile)
        rows += bench_encoding(preset, config, pairs, repeats)
        for r in rows:
            if r["preset"] == preset:
                print(f"  {preset:9s} {r['phase']:6s} {r['path']:18s} {r['pairs_per_s']:8.2f} pairs/s "
                      f"x{r['speedup_vs_old']:.2f}", flush=True)
    print_table(rows)
    write_report({"benchmark": "quantizer_speed", "old_path": "benchmarks/quantizer_baseline.py (before issue 15)",
                  "rows": rows}, args.output)


if __name__ == "__main__":
    main()
