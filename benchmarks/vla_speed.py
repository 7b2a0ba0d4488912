"""Latent VLA speed at the tiny CPU preset (64 px images, patch 8, hidden 128, 4 layers; random init): prediction
latency and throughput of LAPA's cached block decoding against a plain greedy `generate`, training tokens/s with
peak memory, and a correctness check of the fast path. One process, one model. Prints a markdown table and writes
JSON.

    python benchmarks/vla_speed.py                              # llava backbone, the defaults below
    python benchmarks/vla_speed.py --family idefics3
    python benchmarks/vla_speed.py --repeats 5 --train-steps 2  # quick

The model is built as the tiny training preset builds it (`TINY_BACKBONE_SIZES`, byte-level tokenizer, |C| = 8
latent codes, s = 4, N = 256 action bins), with a D = 7 action tokenizer fitted on random data. Inputs are random
uint8 images and instructions of different lengths (so batches are left-padded).

Prediction, for the action block (D tokens) and the latent block (s tokens), at each `--batch-sizes`:

- generate: `model.generate(**inputs, max_new_tokens=K, min_new_tokens=K, do_sample=False)` on already processed
  inputs, the baseline. It decodes over the whole vocabulary, so its tokens need not be action/latent tokens at all.
- generate_block: `model.generate_block(**inputs, num_tokens=K, block=...)` on the same processed inputs: exactly
  K greedy tokens, each restricted to its block. Like-for-like with generate (no preprocessing in either).
- processor + generate: the processor called on the raw images and instructions, then generate: the baseline of
  the next row.
- predict_action / predict_latent_actions: the public API on raw images and instructions (processor included;
  predict_action also turns the bins into continuous actions).
- chunking rows ("predict_action (k=4)"): a model predicting k future actions per call (k x D tokens) against the
  single-step model's predict_action, in actions per second (speed-up = the ratio of actions/s); "static" with the
  static cache. Check: the static path's actions equal the dynamic path's.
- "(static)" rows: the same calls with `cache_implementation="static"` (a preallocated StaticCache and a decoding
  step compiled by torch.compile per shape). Their compilation runs before timing and is reported apart
  (`compile_s`).

Speed-up = the baseline's median / the row's median (generate for the rows without preprocessing, processor +
generate for the rows with it). The functions compared are called in turn within each repeat (rotating the order),
so a change of machine load hits all of them alike. Items: one action (D values) or one latent action (s codes) per
sample; for training, tokens = attention_mask.sum() of the batch.

Check: greedy predict_action's bins (the argmax of the step logits it returns) equal the argmax over the action
block of one teacher-forced forward pass (no cache) on the prompt followed by those bins, and its continuous actions
equal the decoded teacher-forced bins; the same for predict_latent_actions' codes over the latent block. It says the
fast path emits what the model, run plainly, predicts. The static rows' check: that, and their codes, actions and
logits' argmax equal the dynamic path's.

Training: forward + backward + gradient clipping + AdamW step (the tiny pretrain preset's learning rate, betas and
clip norm; vision encoder frozen as in the preset) on a processor-built latent-pretraining batch (images,
instructions, random latent codes) at each `--train-batch-sizes`. Peak RSS: the process's peak resident set during
that batch size's steps (warmup included, so the first batch size also pays for the AdamW state), as MiB above the
level when its steps started (memory the allocator kept from earlier phases is reused, not counted again) and as the
absolute peak, sampled every millisecond by a background thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import PeakRSS, write_report
from modeling_lapa import LAPAConfig, LAPAForActionPrediction, count_image_tokens, tiny_backbone_config
from processing_lapa import LAPAImageProcessor, LAPAProcessor, build_tiny_tokenizer
from training.vla_training import STAGE_PRESETS, TINY_BACKBONE_SIZES, VLATrainingConfig

INSTRUCTIONS = [
    "open the drawer",
    "pick up the red cup and put it in the sink",
    "push the button",
    "move the blue block to the left of the green bowl",
    "close the microwave door",
    "wipe the table",
    "put the spoon next to the plate on the counter",
    "turn the faucet on",
]
DATASET = "random"


def build(family: str, attn_implementation: str, num_bins: int, action_dim: int, num_latent_codes: int,
          latent_length: int, seed: int, chunk_size: int = 1):
    """The tiny preset's processor and model (random init), with an action tokenizer fitted on random actions;
    `chunk_size` = k actions per prediction (action chunking)."""
    torch.manual_seed(seed)
    backbone_config = tiny_backbone_config(family, **TINY_BACKBONE_SIZES)
    processor = LAPAProcessor.from_components(
        build_tiny_tokenizer(), LAPAImageProcessor(size=TINY_BACKBONE_SIZES["image_size"]),
        num_latent_codes=num_latent_codes, latent_sequence_length=latent_length, num_action_bins=num_bins,
        num_image_tokens=count_image_tokens(backbone_config), action_chunk_size=chunk_size,
    )
    rng = np.random.default_rng(seed)
    processor.fit_action_tokenizer(rng.normal(size=(20 * num_bins, action_dim)).astype(np.float32), dataset=DATASET)
    config = LAPAConfig.from_processor(backbone_config, processor, freeze_vision_encoder=True)
    config._attn_implementation = attn_implementation
    model = LAPAForActionPrediction(config).eval()
    model.processor = processor
    return processor, model


def random_images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)


def instructions_for(batch: int) -> list[str]:
    return [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]


def time_in_turn(functions: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of each function; within a repeat every function runs once, in a rotating order."""
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    seconds = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def stats_ms(seconds: list[float]) -> tuple[float, float]:
    """(median, 90th percentile) in milliseconds."""
    values = np.asarray(seconds) * 1e3
    return float(np.median(values)), float(np.percentile(values, 90))


@torch.no_grad()
def teacher_forced_argmax(model, inputs: dict, codes: torch.Tensor, block: str) -> torch.Tensor:
    """Argmax over `block` of one uncached forward pass on the prompt followed by `codes` (block indices, (B, K))."""
    c = model.config
    offset, size = ((c.latent_token_offset, c.num_latent_codes) if block == "latent"
                    else (c.action_token_offset, c.num_action_bins))
    k = codes.shape[1]
    input_ids = torch.cat([inputs["input_ids"], codes + offset], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(codes.shape)], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                   logits_to_keep=k + 1).logits
    return logits[:, :-1, offset:offset + size].argmax(-1)


def bench_prediction(model, processor, block: str, batch: int, input_size: int, repeats: int, warmup: int,
                     seed: int) -> list[dict]:
    """The four prediction rows of one block and batch size (see the module docstring)."""
    images = random_images(batch, input_size, seed)
    instructions = instructions_for(batch)
    c = model.config
    num_tokens = processor.action_tokenizer.action_dim(DATASET) if block == "action" else c.latent_sequence_length

    def process():
        out = processor(images=images, text=instructions, return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    inputs = process()

    def generate(prompt):
        return model.generate(**prompt, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False)

    api_name = "predict_action" if block == "action" else "predict_latent_actions"
    api = model.predict_action if block == "action" else model.predict_latent_actions
    static_block, static_api = f"generate_block({block}, static)", f"{api_name}(static)"
    functions = {
        "generate": lambda: generate(inputs),
        f"generate_block({block})": lambda: model.generate_block(**inputs, num_tokens=num_tokens, block=block),
        static_block: lambda: model.generate_block(**inputs, num_tokens=num_tokens, block=block,
                                                   cache_implementation="static"),
        "processor + generate": lambda: generate(process()),
        api_name: lambda: api(images, instructions),
        static_api: lambda: api(images, instructions, cache_implementation="static"),
    }
    # The static rows compile their decoding step on their first call (untimed, reported apart).
    start = time.perf_counter()
    functions[static_block]()
    compile_seconds = time.perf_counter() - start
    seconds = time_in_turn(functions, repeats, warmup)

    # Correctness of the fast path: greedy API output against one teacher-forced forward pass.
    if block == "action":
        actions, step_logits = model.predict_action(images, instructions, return_logits=True)
        codes = step_logits.argmax(-1)
        forced = teacher_forced_argmax(model, inputs, codes, block)
        check = bool(torch.equal(forced, codes)) and bool(
            np.array_equal(actions, processor.action_tokenizer.decode(forced.numpy(), dataset=DATASET)))
        offset, size = c.action_token_offset, c.num_action_bins
    else:
        codes = model.predict_latent_actions(images, instructions)
        forced = teacher_forced_argmax(model, inputs, codes, block)
        check = bool(torch.equal(forced, codes))
        offset, size = c.latent_token_offset, c.num_latent_codes
    block_codes = model.generate_block(**inputs, num_tokens=num_tokens, block=block)
    check = check and bool(torch.equal(block_codes, codes))
    # The static path: the same codes as the dynamic one, through the block call and the public API.
    static_codes = model.generate_block(**inputs, num_tokens=num_tokens, block=block, cache_implementation="static")
    if block == "action":
        static_actions, static_logits = model.predict_action(images, instructions, return_logits=True,
                                                             cache_implementation="static")
        static_check = bool(torch.equal(static_logits.argmax(-1), codes)) and bool(np.array_equal(static_actions,
                                                                                                   actions))
    else:
        static_check = bool(torch.equal(model.predict_latent_actions(images, instructions,
                                                                     cache_implementation="static"), codes))
    static_check = check and static_check and bool(torch.equal(static_codes, codes))
    generated = generate(inputs)[:, -num_tokens:]
    in_block = float(((generated >= offset) & (generated < offset + size)).float().mean())

    item = "action" if block == "action" else "latent action"
    baseline_of = {"generate": "generate", f"generate_block({block})": "generate", static_block: "generate",
                   "processor + generate": "processor + generate", api_name: "processor + generate",
                   static_api: "processor + generate"}
    rows = []
    for name, times in seconds.items():
        median, p90 = stats_ms(times)
        baseline_median, _ = stats_ms(seconds[baseline_of[name]])
        is_fast_path = name in (f"generate_block({block})", api_name, static_block, static_api)
        is_static = name in (static_block, static_api)
        rows.append(dict(
            what=name, block=block, batch=batch, tokens_per_item=num_tokens,
            preprocessing=name in ("processor + generate", api_name, static_api), median_ms=median, p90_ms=p90,
            items_per_s=batch / (median / 1e3), item=item, baseline=baseline_of[name],
            speedup_vs_baseline=baseline_median / median,
            check=(static_check if is_static else check) if is_fast_path else None,
            generated_tokens_in_block=None if is_fast_path else in_block, repeats=len(times),
            compile_s=compile_seconds if name == static_block else None,
        ))
    return rows


def bench_chunking(single, chunked, batch: int, input_size: int, repeats: int, warmup: int, seed: int) -> list[dict]:
    """Actions per second of a chunking model (k actions per call, k x D tokens) against the single-step model's
    predict_action (one action per call), both with the dynamic and the static cache, called in turn."""
    images = random_images(batch, input_size, seed)
    instructions = instructions_for(batch)
    k = chunked.config.action_chunk_size
    functions = {
        "predict_action (k=1)": lambda: single.predict_action(images, instructions),
        f"predict_action (k={k})": lambda: chunked.predict_action(images, instructions),
        f"predict_action (k={k}) static": lambda: chunked.predict_action(images, instructions,
                                                                         cache_implementation="static"),
    }
    functions[f"predict_action (k={k}) static"]()  # compile before timing
    seconds = time_in_turn(functions, repeats, warmup)
    dynamic = chunked.predict_action(images, instructions)
    check = bool(np.array_equal(dynamic, chunked.predict_action(images, instructions, cache_implementation="static")))
    base_median, _ = stats_ms(seconds["predict_action (k=1)"])
    rows = []
    for name, times in seconds.items():
        median, p90 = stats_ms(times)
        per_call = 1 if name == "predict_action (k=1)" else k
        rows.append(dict(
            what=name, block="action", batch=batch, tokens_per_item=None, preprocessing=True, median_ms=median,
            p90_ms=p90, items_per_s=batch * per_call / (median / 1e3), item="action", baseline="predict_action (k=1)",
            speedup_vs_baseline=(batch * per_call / median) / (batch / base_median), check=None if per_call == 1
            else check, generated_tokens_in_block=None, repeats=len(times), actions_per_call=per_call,
        ))
    return rows


def bench_training(model, processor, batch: int, input_size: int, steps: int, warmup: int, seed: int) -> dict:
    """Forward + backward + clip + AdamW steps on a latent-pretraining batch; per-step times, tokens/s, peak RSS."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, model.config.num_latent_codes, size=(batch, model.config.latent_sequence_length))
    inputs = dict(processor(images=random_images(batch, input_size, seed), text=instructions_for(batch),
                            latent_codes=codes, return_tensors="pt"))
    tokens = int(inputs["attention_mask"].sum())
    preset = STAGE_PRESETS["pretrain"]["tiny"]
    defaults = VLATrainingConfig()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=preset["learning_rate"], betas=tuple(defaults.adam_betas),
                                  weight_decay=preset.get("weight_decay", defaults.weight_decay))
    model.train()

    def one_step():
        out = model(**inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, defaults.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = []
    with PeakRSS() as memory:
        for _ in range(warmup):
            one_step()
        for _ in range(steps):
            start = time.perf_counter()
            one_step()
            seconds.append(time.perf_counter() - start)
    model.eval()
    median, p90 = stats_ms(seconds)
    return dict(
        what="train step (fwd+bwd+AdamW)", block="latent", batch=batch, tokens_per_item=None, preprocessing=False,
        median_ms=median, p90_ms=p90, items_per_s=tokens / (median / 1e3), item="token", baseline=None,
        speedup_vs_baseline=None, check=None, generated_tokens_in_block=None, repeats=steps,
        tokens_per_batch=tokens, sequence_length=int(inputs["input_ids"].shape[1]),
        peak_rss_increase_mib=memory.mib, peak_rss_mib=memory.peak / 2**20,
    )


def markdown_table(rows: list[dict]) -> str:
    header = ["what", "batch", "preprocessing", "median ms", "p90 ms", "items/s", "item", "speed-up", "check",
              "peak RSS MiB (+rise)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + [":-:"] + ["--:"] * 3 + ["---"]
                                                                 + ["--:", ":-:", "--:"]) + "|"]
    for r in rows:
        speedup = "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}x"
        if r["baseline"] == r["what"]:
            speedup += " (baseline)"
        check = "-" if r["check"] is None else str(r["check"])
        memory = "-" if "peak_rss_mib" not in r else f"{r['peak_rss_mib']:.0f} (+{r['peak_rss_increase_mib']:.0f})"
        cells = [r["what"], str(r["batch"]), "yes" if r["preprocessing"] else "no", f"{r['median_ms']:.1f}",
                 f"{r['p90_ms']:.1f}", f"{r['items_per_s']:.1f}", r["item"], speedup, check, memory]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=["llava", "idefics3"],
                        help="backbone family of the tiny model (default: llava, as the tiny training preset)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                        help="attention of the backbone (default: sdpa, as training)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16],
                        help="prediction batch sizes (default: 1 16)")
    parser.add_argument("--repeats", type=int, default=30,
                        help="timed calls of each prediction function per block and batch size (default: 30)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls of each prediction function before timing (default: 3)")
    parser.add_argument("--train-batch-sizes", type=int, nargs="+", default=[8, 32],
                        help="training batch sizes (default: 8 32)")
    parser.add_argument("--train-steps", type=int, default=8, help="timed training steps per batch size (default: 8)")
    parser.add_argument("--train-warmup", type=int, default=2,
                        help="untimed training steps per batch size before timing (default: 2)")
    parser.add_argument("--action-dim", type=int, default=7, help="D, dimensions of the fitted actions (default: 7)")
    parser.add_argument("--chunk-size", type=int, default=4,
                        help="k of the action-chunking rows (actions/s of a model predicting k actions per call "
                             "against the single-step one; default: 4, 1 skips them)")
    parser.add_argument("--num-bins", type=int, default=256, help="N, action bins per dimension (default: 256)")
    parser.add_argument("--num-latent-codes", type=int, default=8, help="|C|, latent codebook size (default: 8)")
    parser.add_argument("--latent-length", type=int, default=4, help="s, latent codes per action (default: 4)")
    parser.add_argument("--input-size", type=int, default=TINY_BACKBONE_SIZES["image_size"],
                        help="side of the random square input images in pixels, before the processor resizes them "
                             f"(default: {TINY_BACKBONE_SIZES['image_size']}, the model's size)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, normally one per core)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, images and codes (default: 0)")
    parser.add_argument("--output", default="benchmarks/results/vla_speed.json",
                        help="where to write the JSON report (default: benchmarks/results/vla_speed.json)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    processor, model = build(args.family, args.attn_implementation, args.num_bins, args.action_dim,
                             args.num_latent_codes, args.latent_length, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny {args.family} ({args.attn_implementation}): {n_params / 1e6:.2f}M parameters, "
          f"{model.config.num_image_tokens} image tokens, vocabulary {processor.vocab_size}, "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)

    rows = []
    for block in ("action", "latent"):
        for batch in args.batch_sizes:
            new = bench_prediction(model, processor, block, batch, args.input_size, args.repeats, args.warmup,
                                   args.seed)
            rows += new
            print("  " + "  ".join(f"{r['what']} {r['median_ms']:.1f} ms" for r in new) + f"  (batch {batch})",
                  flush=True)
    if args.chunk_size > 1:
        _, chunked = build(args.family, args.attn_implementation, args.num_bins, args.action_dim,
                           args.num_latent_codes, args.latent_length, args.seed, chunk_size=args.chunk_size)
        for batch in args.batch_sizes:
            new = bench_chunking(model, chunked, batch, args.input_size, args.repeats, args.warmup, args.seed)
            rows += new
            print("  " + "  ".join(f"{r['what']} {r['items_per_s']:.0f} actions/s" for r in new)
                  + f"  (batch {batch})", flush=True)
    for batch in args.train_batch_sizes:
        row = bench_training(model, processor, batch, args.input_size, args.train_steps, args.train_warmup,
                             args.seed)
        rows.append(row)
        print(f"  train batch {batch}: {row['median_ms']:.1f} ms/step, {row['items_per_s']:.0f} tokens/s", flush=True)

    print("\n" + markdown_table(rows))
    shares = []
    for block in ("action", "latent"):
        values = [r["generated_tokens_in_block"] for r in rows
                  if r["block"] == block and r["generated_tokens_in_block"] is not None]
        if values:
            shares.append(f"{np.mean(values):.0%} in the {block} block when asked for {block} tokens")
    print("\nspeed-up: the baseline's median / the row's median (generate for rows without preprocessing, processor "
          "+ generate for rows with it). check: greedy output == teacher-forced block argmax (and == generate_block's "
          "output). Plain generate decodes over the whole vocabulary: of its tokens, " + ", ".join(shares) + ".")
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    write_report({"benchmark": "vla_speed", "settings": {**settings, "params_m": n_params / 1e6,
                                                         "tiny_backbone_sizes": TINY_BACKBONE_SIZES,
                                                         "num_image_tokens": model.config.num_image_tokens},
                  "rows": rows}, args.output)


if __name__ == "__main__":
    main()
