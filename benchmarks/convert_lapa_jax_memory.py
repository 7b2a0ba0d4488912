"""Peak memory and speed of the JAX -> PyTorch LAPA converter on a multi-GB synthetic params stream.

    python benchmarks/convert_lapa_jax_memory.py                       # ~3.6 GB stream, shards of 2 GB and 0.5 GB
    python benchmarks/convert_lapa_jax_memory.py --layers 8 --shard-sizes 1GB
    python benchmarks/convert_lapa_jax_memory.py --vqgan    # the complete LAPA folder: + a released-size VQGAN

The stream has the released LAPA-7B's keys and layout (bf16, layers stacked on axis 0, the authors' byte format)
at a smaller width (hidden 2048, intermediate 5632, 32 layers by default), written by `jax_stream.write_stream`.
Each conversion runs in a fresh process; its peak resident memory above the imports is sampled (`PeakRSS`) and
compared with the stream size, the largest single tensor of the stream and the shard size: a converter that held
the file, or two copies of a stacked kernel, would show it. A few converted tensors are checked bit for bit.
With `--vqgan` a random VQGAN pickle of the released size (585 MB, the tree of
tests/fixtures/lapa_vla/tiny_config.json) is converted too, into the complete LAPAForActionPrediction folder: the
pickle is read whole (pickles do not stream), written first and released array by array.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PeakRSS, write_report


def synthetic_config(layers: int, hidden: int, intermediate: int, heads: int) -> dict:
    from modeling_lapa.convert_lapa_jax import LAPA_7B_CONFIG

    return {**LAPA_7B_CONFIG, "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": intermediate, "num_attention_heads": heads}


def write_synthetic_stream(path: Path, config_values: dict, seed: int = 0) -> dict:
    """Random finite bf16 values (bits below 1.0) for every key of the expected tree, one tensor at a time."""
    from modeling_lapa.convert_lapa_jax import expected_param_tree
    from modeling_lapa.jax_stream import write_stream
    from modeling_lapa.modeling_lwm import LWMConfig

    tree = expected_param_tree(LWMConfig(**config_values))
    rng = np.random.default_rng(seed)

    def entries():
        for key in sorted(tree):  # the authors' files are in alphabetical key order
            yield key, (rng.integers(0, 0x3F80, size=tree[key], dtype=np.uint16), "bfloat16")

    write_stream(path, entries())
    largest = max(int(np.prod(s)) * 2 for s in tree.values())
    return {"stream_bytes": path.stat().st_size, "largest_tensor_bytes": largest, "num_keys": len(tree)}


def write_synthetic_vqgan(path: Path, seed: int = 0) -> int:
    """A pickled nested dict of random float32 arrays with the released VQGAN's tree (like the released `vqgan`)."""
    import pickle

    spec = json.loads((Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lapa_vla"
                       / "tiny_config.json").read_text())
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for key, shape in spec["vqgan"]["real_param_tree"].items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = rng.standard_normal(shape, dtype=np.float32) * 0.02
    with open(path, "wb") as f:
        pickle.dump(tree, f, protocol=4)
    return path.stat().st_size


def convert_in_this_process(params: str, output: str, config_json: str, max_shard_size: str,
                            vqgan: str | None = None) -> dict:
    import torch

    from modeling_lapa.convert_lapa_jax import convert_lapa, convert_params
    from modeling_lapa.modeling_lwm import LWMConfig

    torch.set_num_threads(1)
    config = LWMConfig(**json.loads(config_json))
    start = time.perf_counter()
    with PeakRSS(interval=0.005) as peak:
        if vqgan:
            convert_lapa(params, vqgan, output, config=config, max_shard_size=max_shard_size)
        else:
            convert_params(params, output, config, max_shard_size=max_shard_size)
    seconds = time.perf_counter() - start
    return {"peak_rss_above_imports_mib": round(peak.mib, 1), "seconds": round(seconds, 1)}


def check_some_tensors(params: Path, output: Path, config_values: dict, prefix: str = "") -> None:
    """A stacked kernel's last layer, the vision embedding block and the latent head, bit for bit."""
    import torch
    from safetensors import safe_open

    from modeling_lapa.convert_lapa_jax import interleaved_to_half_split
    from modeling_lapa.jax_stream import scan_stream
    from modeling_lapa.modeling_lwm import LWMConfig

    config = LWMConfig(**config_values)
    index = {t.key: t for t in scan_stream(params)}
    index_file = output / "model.safetensors.index.json"
    weight_map = json.loads(index_file.read_text())["weight_map"] if index_file.exists() else {}

    def ours(name):
        name = prefix + name
        with safe_open(str(output / weight_map.get(name, "model.safetensors")), "pt") as f:
            return f.get_tensor(name)

    last = config.num_hidden_layers - 1
    wq = index[("transformer", "h", "scan_decoder", "attention", "wq", "kernel")].torch(last)
    assert torch.equal(ours(f"model.layers.{last}.self_attn.q_proj.weight"),
                       interleaved_to_half_split(wq.t(), config.head_dim))
    w1 = index[("transformer", "h", "scan_decoder", "feed_forward", "w1", "kernel")].torch(last)
    assert torch.equal(ours(f"model.layers.{last}.mlp.gate_proj.weight"), w1.t())
    blocks = config.block_slices()
    assert torch.equal(ours("model.embed_tokens.weight")[blocks["vision"]],
                       index[("transformer", "vte", "embedding")].torch())
    assert torch.equal(ours("lm_head.weight")[blocks["latent"]], index[("delta_head", "kernel")].torch().t())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="transformer layers of the synthetic model (7B: 32)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (7B: 4096; 2048 keeps the stream at ~3.4 GiB)")
    parser.add_argument("--intermediate", type=int, default=5632, help="MLP width (7B: 11008)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads")
    parser.add_argument("--shard-sizes", nargs="+", default=["2GB", "500MB"], help="safetensors shard sizes to measure")
    parser.add_argument("--workdir", default=None, help="where to write the stream and outputs (default: a temp dir)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"
                                                / "convert_lapa_jax_memory.json"))
    parser.add_argument("--vqgan", action=argparse.BooleanOptionalAction, default=False,
                        help="also convert a released-size synthetic VQGAN (the complete LAPA folder)")
    parser.add_argument("--convert-only", nargs="+", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.convert_only:
        print(json.dumps(convert_in_this_process(*args.convert_only)))
        return 0

    config_values = synthetic_config(args.layers, args.hidden, args.intermediate, args.heads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        params = tmp / "params"
        start = time.perf_counter()
        stream = write_synthetic_stream(params, config_values)
        stream["write_seconds"] = round(time.perf_counter() - start, 1)
        vqgan = []
        if args.vqgan:
            stream["vqgan_bytes"] = write_synthetic_vqgan(tmp / "vqgan")
            vqgan = [str(tmp / "vqgan")]
        runs = []
        for shard in args.shard_sizes:
            out = tmp / f"converted_{shard}"
            result = subprocess.run(
                [sys.executable, __file__, "--convert-only", str(params), str(out), json.dumps(config_values), shard,
                 *vqgan],
                check=True, capture_output=True, text=True,
            )
            run = {"max_shard_size": shard, **json.loads(result.stdout.strip().splitlines()[-1])}
            check_some_tensors(params, out, config_values, prefix="backbone." if args.vqgan else "")
            run["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            runs.append(run)
            for p in out.iterdir():
                p.unlink()
    if args.vqgan:
        print(f"+ VQGAN pickle {stream['vqgan_bytes'] / 2**20:.0f} MiB (complete LAPA folder)")
    print(f"stream: {stream['stream_bytes'] / 2**30:.2f} GiB, {stream['num_keys']} keys, largest tensor "
          f"{stream['largest_tensor_bytes'] / 2**20:.0f} MiB (written in {stream['write_seconds']} s)")
    print(f"{'max shard':>10} {'peak RSS MiB':>13} {'seconds':>8}")
    for run in runs:
        print(f"{run['max_shard_size']:>10} {run['peak_rss_above_imports_mib']:>13} {run['seconds']:>8}")
    output = args.output
    if args.vqgan and output.endswith("convert_lapa_jax_memory.json"):
        output = output.replace("convert_lapa_jax_memory.json", "convert_lapa_jax_memory_with_vqgan.json")
    write_report({"benchmark": "convert_lapa_jax_memory", "config": config_values, "stream": stream, "runs": runs,
                  "vqgan": args.vqgan}, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
