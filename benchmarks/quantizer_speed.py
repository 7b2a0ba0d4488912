"""Quantizer speed and memory: training-step and encode throughput (pairs/s) and peak memory, at the tiny preset
and at the reference size, for the SDPA attention path against a plain eager attention of the same math, in the
same process. Prints a table and writes JSON.

    python benchmarks/quantizer_speed.py                       # tiny + reference (a few steps each)
    python benchmarks/quantizer_speed.py --presets tiny --steps 20

Peak memory is the peak resident set size above the level before each phase, sampled every millisecond by a
background thread (CPU has no allocator statistics like `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import PeakRSS, write_report
from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel


def bench_training(model, pairs, steps, warmup):
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))

    def one_step(step):
        out = model(pairs, step=step)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        one_step(i + 1)
    with PeakRSS() as memory:
        start = time.perf_counter()
        for i in range(steps):
            one_step(warmup + i + 1)
        seconds = time.perf_counter() - start
    return pairs.shape[0] * steps / seconds, memory.mib


@torch.no_grad()
def bench_encode(model, pairs, steps, warmup):
    model.eval()
    for _ in range(warmup):
        model.encode(pairs)
    with PeakRSS() as memory:
        start = time.perf_counter()
        for _ in range(steps):
            codes = model.encode(pairs).codes
        seconds = time.perf_counter() - start
    return pairs.shape[0] * steps / seconds, memory.mib, codes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "reference"], choices=["tiny", "reference"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="per preset (default: tiny 32, reference 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: tiny 10, reference 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/quantizer_speed.json")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    default_batch = {"tiny": 32, "reference": 2}
    default_steps = {"tiny": 10, "reference": 2}
    rows = []
    for i, preset in enumerate(args.presets):
        batch = args.batch_size[i] if args.batch_size else default_batch[preset]
        steps = args.steps or default_steps[preset]
        torch.manual_seed(0)
        config = LAPAQuantizerConfig.from_preset(preset)
        model = LAPAQuantizerModel(config)
        n_params = sum(p.numel() for p in model.parameters())
        pairs = torch.rand(batch, 2, 3, config.image_size, config.image_size)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        codes_by_impl = {}
        for impl in ("eager", "sdpa"):
            model.load_state_dict(initial)  # both paths train from the same weights
            model.config._attn_implementation = impl
            train_pps, train_mib = bench_training(model, pairs, steps, args.warmup)
            model.load_state_dict(initial)
            encode_pps, encode_mib, codes = bench_encode(model, pairs, steps, args.warmup)
            codes_by_impl[impl] = codes
            rows.append(dict(
                preset=preset, attention=impl, params_m=round(n_params / 1e6, 2), image_size=config.image_size,
                batch_size=batch, steps=steps, train_pairs_per_s=train_pps, train_peak_mib=train_mib,
                encode_pairs_per_s=encode_pps, encode_peak_mib=encode_mib,
            ))
            print(f"  {preset:9s} {impl:5s} train {train_pps:8.2f} pairs/s  encode {encode_pps:8.2f} pairs/s", flush=True)
        eager_row, sdpa_row = rows[-2], rows[-1]
        for row in (eager_row, sdpa_row):
            row["train_speedup_vs_eager"] = row["train_pairs_per_s"] / eager_row["train_pairs_per_s"]
            row["encode_speedup_vs_eager"] = row["encode_pairs_per_s"] / eager_row["encode_pairs_per_s"]
        sdpa_row["same_codes_as_eager"] = bool(torch.equal(codes_by_impl["eager"], codes_by_impl["sdpa"]))
        eager_row["same_codes_as_eager"] = True
        del model

    header = (f"{'preset':9s} {'attn':5s} {'params':>8s} {'px':>4s} {'batch':>5s} {'train pairs/s':>14s} "
              f"{'x eager':>8s} {'train MiB':>10s} {'encode pairs/s':>15s} {'x eager':>8s} {'encode MiB':>11s} {'codes==':>7s}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['preset']:9s} {r['attention']:5s} {r['params_m']:7.2f}M {r['image_size']:4d} {r['batch_size']:5d} "
              f"{r['train_pairs_per_s']:14.2f} {r['train_speedup_vs_eager']:8.2f} {r['train_peak_mib']:10.0f} "
              f"{r['encode_pairs_per_s']:15.2f} {r['encode_speedup_vs_eager']:8.2f} {r['encode_peak_mib']:11.0f} "
              f"{str(r['same_codes_as_eager']):>7s}")
    write_report({"benchmark": "quantizer_speed", "rows": rows}, args.output)


if __name__ == "__main__":
    main()
