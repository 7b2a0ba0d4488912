"""Convert the authors' released JAX VLA (LAPA-7B: `params`, `vqgan`, `tokenizer.model`) into our PyTorch model.

    python -m modeling_lapa.convert_lapa_jax --params params --vqgan vqgan --tokenizer tokenizer.model \
        --output ./LAPA-7B --config lapa-7b --dtype bfloat16 --latent-sequence-length 4

(`--config` takes `lapa-7b` or a config.json; the other options shown are the defaults.)

With `--vqgan` the output is a complete `LAPAForActionPrediction` folder (backbone family "lwm"): config.json
(LAPAConfig with the LWM backbone config and the VQGAN sub-config, `auto_map`), sharded safetensors holding
`backbone.*` (the params below, `--dtype`) and `vqgan.*` (the VQGAN pickle, read with `convert_lwm_vqgan`'s
restricted unpickler, float32), the model's remote code, and with `--tokenizer` the processor (`LWMProcessor`: the
LLaMA-2 tokenizer from `tokenizer.model`, the authors' prompt layout, `LWMImageProcessor`) and its remote code.
`AutoModel.from_pretrained(folder)` then returns the model with `model.processor` set. Without `--vqgan` the output
is a bare `LWMForCausalLM` folder.

The params stream (see `jax_stream`) is mapped strictly onto `LWMForCausalLM`: every key of the authors' tree must
map onto our parameters and every parameter must be filled, with the expected shape; anything else fails before a
byte of tensor data is read, naming the keys. The mapping:

    transformer/{wte,vte,dte,ate}/embedding      -> row blocks of model.embed_tokens.weight (text, vision, latent,
                                                    action), as stored
    {lm_head,vision_head,delta_head,action_head}/kernel (in, out)
                                                 -> the same row blocks of lm_head.weight, transposed
    transformer/h/scan_decoder/<param> (layers stacked on axis 0; also h/<i>/<param> unstacked)
        attention/wq, attention/wk               -> self_attn.{q,k}_proj.weight: transposed, and each head's rows
                                                    reordered from Meta's interleaved RoPE pairs to the half-split
                                                    layout (even rows, then odd rows)
        attention/wv, attention/wo               -> self_attn.{v,o}_proj.weight (transposed)
        feed_forward/w1, w3, w2                  -> mlp.{gate,up,down}_proj.weight (transposed)
        attention_norm, ffn_norm                 -> input_layernorm, post_attention_layernorm
    transformer/ln_f/kernel                      -> model.norm.weight

Streaming: the stream is indexed by its headers, then each output tensor is built from its sources read straight
from the file (one layer slice of a stacked kernel at a time) and written to its safetensors shard at once (the
shard headers are planned from the shapes first): memory holds about one output tensor (the largest is the
combined embedding, 331 MB at 7B), never the 13.6 GB file. bf16 values are copied bit for bit (default output
dtype bfloat16).

The VQGAN pickle (585 MB at 7B) is read whole (a pickle cannot be streamed); its tensors are planned first and
written first, each array dropped once written, before the params stream is converted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import numpy as np

from .configuration_lapa import LAPAConfig, count_image_tokens
from .convert_lwm_vqgan import flatten_params, load_vqgan_pickle, vqgan_key_map
from .jax_stream import StreamTensor, scan_stream
from .modeling_lwm import LWMConfig, LWMForCausalLM
from .vqgan_lwm import LWMVQGANConfig

# The released LAPA-7B (LWM = LLaMA-2-7B; the authors' 7b config, delta_vocab_size 8). Heads are not in the
# stream's shapes, so the config has to say them.
LAPA_7B_CONFIG = dict(
    text_vocab_size=32000, vision_vocab_size=8448, latent_vocab_size=8, action_vocab_size=0, hidden_size=4096,
    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=5e7,
    max_position_embeddings=32768, rope_table_dtype="bfloat16",
)

# The authors' names of the four vocabularies' input tables and output heads, in our block order.
_EMBEDDING_KEYS = {
    "text": ("transformer", "wte", "embedding"),
    "vision": ("transformer", "vte", "embedding"),
    "latent": ("transformer", "dte", "embedding"),
    "action": ("transformer", "ate", "embedding"),
}
_HEAD_KEYS = {
    "text": ("lm_head", "kernel"),
    "vision": ("vision_head", "kernel"),
    "latent": ("delta_head", "kernel"),
    "action": ("action_head", "kernel"),
}
_FINAL_NORM_KEY = ("transformer", "ln_f", "kernel")
_LAYERS_KEY = ("transformer", "h")
_SCANNED = "scan_decoder"
# per-layer param (under transformer/h/scan_decoder or transformer/h/<i>) -> (our name in the layer, transform)
_LAYER_PARAMS = {
    ("attention", "wq", "kernel"): ("self_attn.q_proj.weight", "rope"),
    ("attention", "wk", "kernel"): ("self_attn.k_proj.weight", "rope"),
    ("attention", "wv", "kernel"): ("self_attn.v_proj.weight", "transpose"),
    ("attention", "wo", "kernel"): ("self_attn.o_proj.weight", "transpose"),
    ("feed_forward", "w1", "kernel"): ("mlp.gate_proj.weight", "transpose"),
    ("feed_forward", "w3", "kernel"): ("mlp.up_proj.weight", "transpose"),
    ("feed_forward", "w2", "kernel"): ("mlp.down_proj.weight", "transpose"),
    ("attention_norm", "kernel"): ("input_layernorm.weight", "none"),
    ("ffn_norm", "kernel"): ("post_attention_layernorm.weight", "none"),
}


class ConversionError(ValueError):
    """The authors' param tree does not match the target config (names every missing, unexpected or mis-shaped
    key)."""


# -- the mapping --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a piece of an output tensor comes from: a stream key, optionally one slice along axis 0 (a layer of a
    stacked kernel), how to transform it, and which rows of the output it fills (None = all)."""

    key: tuple[str, ...]
    index: int | None
    transform: str  # "none", "transpose", "rope" (transpose + interleaved -> half-split rows per head)
    rows: slice | None = None


@dataclass(frozen=True)
class Target:
    """One tensor of our state dict and the sources that fill it."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[Source, ...]
    dtype: torch.dtype | None = None  # None: the writer's dtype


def _layer_source_shape(param: tuple[str, ...], config: LWMConfig) -> tuple[int, ...]:
    hidden, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    return {
        ("attention", "wq", "kernel"): (hidden, q_out),
        ("attention", "wk", "kernel"): (hidden, kv_out),
        ("attention", "wv", "kernel"): (hidden, kv_out),
        ("attention", "wo", "kernel"): (q_out, hidden),
        ("feed_forward", "w1", "kernel"): (hidden, inter),
        ("feed_forward", "w3", "kernel"): (hidden, inter),
        ("feed_forward", "w2", "kernel"): (inter, hidden),
        ("attention_norm", "kernel"): (hidden,),
        ("ffn_norm", "kernel"): (hidden,),
    }[param]


def expected_param_tree(config: LWMConfig, scan_layers: bool = True) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The authors' param tree (key path -> shape) of a model with `config`: what their module's init would give
    (layers stacked on axis 0 under `transformer/h/scan_decoder` with `scan_layers`, else `transformer/h/<i>`)."""
    tree: dict[tuple[str, ...], tuple[int, ...]] = {}
    sizes = {name: block.stop - block.start for name, block in config.block_slices().items()}
    for name, size in sizes.items():
        if size:
            tree[_EMBEDDING_KEYS[name]] = (size, config.hidden_size)
            tree[_HEAD_KEYS[name]] = (config.hidden_size, size)
    tree[_FINAL_NORM_KEY] = (config.hidden_size,)
    for param in _LAYER_PARAMS:
        shape = _layer_source_shape(param, config)
        if scan_layers:
            tree[_LAYERS_KEY + (_SCANNED,) + param] = (config.num_hidden_layers, *shape)
        else:
            for layer in range(config.num_hidden_layers):
                tree[_LAYERS_KEY + (str(layer),) + param] = shape
    return tree


def check_param_tree(tree: Mapping[tuple[str, ...], tuple[int, ...]], config: LWMConfig) -> bool:
    """Check the authors' `tree` (key path -> shape) against `config`, strictly. Returns whether the layers are
    stacked (`scan_decoder`). Raises `ConversionError` naming every missing, unexpected or mis-shaped key."""
    tree = {tuple(k): tuple(v) for k, v in tree.items()}
    scanned = any(k[:3] == _LAYERS_KEY + (_SCANNED,) for k in tree)
    expected = expected_param_tree(config, scan_layers=scanned)
    missing = sorted("/".join(k) for k in expected.keys() - tree.keys())
    unexpected = sorted("/".join(k) for k in tree.keys() - expected.keys())
    mismatched = sorted(
        f"{'/'.join(k)}: file {tree[k]} vs config {expected[k]}"
        for k in expected.keys() & tree.keys() if tree[k] != expected[k]
    )
    problems = [f"{kind}: {keys}" for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if keys]
    if problems:
        hint = ""
        if any(k[-2] in ("ate", "action_head") for k in (tuple(u.split("/")) for u in unexpected)):
            hint = " (an action-finetuned checkpoint: set action_vocab_size in the config)"
        raise ConversionError("the params do not match the config" + hint + ":\n  " + "\n  ".join(problems))
    return scanned


def conversion_plan(tree: Mapping[tuple[str, ...], tuple[int, ...]], config: LWMConfig,
                    prefix: str = "") -> list[Target]:
    """Our state dict as a list of `Target`s (name, shape, sources), in writing order, after checking `tree`
    strictly. `prefix` is prepended to every name (e.g. "backbone." inside the VLA)."""
    scanned = check_param_tree(tree, config)
    blocks = {name: block for name, block in config.block_slices().items() if block.stop > block.start}
    vocab, hidden = config.vocab_size, config.hidden_size
    plan = [Target(f"{prefix}model.embed_tokens.weight", (vocab, hidden),
                   tuple(Source(_EMBEDDING_KEYS[n], None, "none", b) for n, b in blocks.items()))]
    for layer in range(config.num_hidden_layers):
        for param, (name, transform) in _LAYER_PARAMS.items():
            shape = _layer_source_shape(param, config)
            if transform != "none":
                shape = shape[::-1]
            if scanned:
                source = Source(_LAYERS_KEY + (_SCANNED,) + param, layer, transform)
            else:
                source = Source(_LAYERS_KEY + (str(layer),) + param, None, transform)
            plan.append(Target(f"{prefix}model.layers.{layer}.{name}", shape, (source,)))
    plan.append(Target(f"{prefix}model.norm.weight", (hidden,), (Source(_FINAL_NORM_KEY, None, "none"),)))
    plan.append(Target(f"{prefix}lm_head.weight", (vocab, hidden),
                       tuple(Source(_HEAD_KEYS[n], None, "transpose", b) for n, b in blocks.items())))
    return plan


def interleaved_to_half_split(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the output rows (out, in) of a q or k projection, per head, from Meta's interleaved RoPE pairs
    (rows 2i, 2i+1 rotate together) to transformers' half-split pairs (rows i, i + head_dim/2): even rows first,
    then odd rows. The same permutation on q and k leaves every attention score unchanged."""
    out_features, in_features = weight.shape
    heads = out_features // head_dim
    return weight.reshape(heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def half_split_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half_split`."""
    out_features, in_features = weight.shape
    heads = out_features // head_dim
    return weight.reshape(heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _transformed(value: torch.Tensor, transform: str, head_dim: int) -> torch.Tensor:
    if transform == "none":
        return value
    value = value.t()
    if transform == "rope":
        value = interleaved_to_half_split(value, head_dim)
    return value


def iter_converted_tensors(plan: Iterable[Target], tensors: Mapping[tuple[str, ...], StreamTensor],
                           config: LWMConfig,
                           dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every target of `plan`, in order, reading the sources one at a time.

    `tensors` maps key paths to objects with `.torch(index=None)` (`StreamTensor`s from `scan_stream`)."""
    for target in plan:
        if len(target.sources) == 1 and target.sources[0].rows is None:
            source = target.sources[0]
            value = _transformed(tensors[source.key].torch(source.index), source.transform, config.head_dim)
            value = value.to(dtype).contiguous()
        else:
            value = torch.empty(target.shape, dtype=dtype)
            for source in target.sources:
                piece = _transformed(tensors[source.key].torch(source.index), source.transform, config.head_dim)
                value[source.rows] = piece.to(dtype)
                del piece
        if tuple(value.shape) != target.shape:
            raise ConversionError(f"{target.name}: built {tuple(value.shape)}, expected {target.shape}")
        yield target.name, value


# -- writing ------------------------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def _write_safetensors_file(path: Path, targets: list[Target], dtype: torch.dtype,
                            tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Write one safetensors file whose tensors arrive one by one: the header (names, dtypes, shapes, offsets) is
    known from `targets`, so it goes first and each tensor's bytes follow as soon as it is built. Memory holds one
    tensor, not the shard. Returns the data size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for target in targets:
        size = _nbytes(target, dtype)
        header[target.name] = {"dtype": _SAFETENSORS_DTYPES[target.dtype or dtype], "shape": list(target.shape),
                               "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned (the format pads with spaces)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for target in targets:
            name, value = next(tensors)
            if name != target.name:
                raise ConversionError(f"tensor {name} arrived where {target.name} was planned")
            wanted = target.dtype or dtype
            if value.dtype != wanted or tuple(value.shape) != target.shape:
                raise ConversionError(f"{name}: {value.dtype} {tuple(value.shape)} instead of {wanted} {target.shape}")
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value
    return offset


def _nbytes(target: Target, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=target.dtype or dtype).element_size()
    return itemsize * int(torch.Size(target.shape).numel())


def write_sharded_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], plan: list[Target], dtype: torch.dtype,
                              output_dir: str | os.PathLike, max_shard_size: int | str = "2GB") -> list[str]:
    """Write `tensors` (yielded in `plan` order) as transformers' (sharded) safetensors: `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`. Shards are planned from the shapes up
    front, so names and headers are final before any data arrives; each tensor is written as soon as it is built
    (memory holds one tensor at a time). Returns the written file names."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported output dtype {dtype}; choose one of {list(_SAFETENSORS_DTYPES)}")
    limit = _parse_size(max_shard_size)
    shards: list[list[Target]] = [[]]
    used = 0
    for target in plan:
        size = _nbytes(target, dtype)
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(target)
        used += size
    count = len(shards)
    names = (["model.safetensors"] if count == 1 else
             [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    iterator = iter(tensors)
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        total += _write_safetensors_file(output_dir / file_name, shard, dtype, iterator)
        weight_map.update({target.name: file_name for target in shard})
    if next(iterator, None) is not None:
        raise ConversionError("more tensors than planned")
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def convert_params(params_path: str | os.PathLike, output_dir: str | os.PathLike, config: LWMConfig | None = None,
                   dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = "2GB",
                   prefix: str = "") -> LWMConfig:
    """Convert the authors' params stream into `output_dir` (sharded safetensors + config.json) for
    `LWMForCausalLM`. The tree is checked strictly against `config` (default: LAPA-7B) before any data is read."""
    config = config if config is not None else LWMConfig(**LAPA_7B_CONFIG)
    index: dict[tuple[str, ...], StreamTensor] = {}
    for tensor in scan_stream(params_path):
        if tensor.key in index:
            raise ConversionError(f"{params_path} holds {tensor.name} more than once")
        index[tensor.key] = tensor
    plan = conversion_plan({k: t.shape for k, t in index.items()}, config, prefix=prefix)
    tensors = iter_converted_tensors(plan, index, config, dtype=dtype)
    write_sharded_safetensors(tensors, plan, dtype, output_dir, max_shard_size=max_shard_size)
    config = LWMConfig.from_dict(config.to_dict())
    config.architectures = [LWMForCausalLM.__name__]
    config.dtype = dtype
    config.save_pretrained(output_dir)
    return config


# -- the complete VLA folder: backbone + VQGAN + processor ---------------------------------------------------------
def vqgan_targets(shapes: Mapping[str, tuple[int, ...]], prefix: str = "vqgan."):
    """The VQGAN's part of the plan from its Flax tree ('/'-joined key -> shape), checked strictly against
    `LWMVQGANModel`. Returns (config, {flax key: target name}, targets in that order), float32 targets."""
    shapes = {key: tuple(shape) for key, shape in shapes.items()}
    config = LWMVQGANConfig.from_param_shapes(shapes)
    mapping = vqgan_key_map(shapes, config)  # strict: every key, every parameter, every shape

    def torch_shape(key):
        shape = shapes[key]
        return (shape[3], shape[2], shape[0], shape[1]) if key.endswith("/kernel") and len(shape) == 4 else shape

    mapping = {key: prefix + name for key, name in mapping.items()}
    targets = [Target(name, torch_shape(key), (), torch.float32) for key, name in mapping.items()]
    return config, mapping, targets


def vqgan_plan(vqgan_path: str | os.PathLike, prefix: str = "vqgan."):
    """Read the authors' VQGAN pickle (restricted unpickler: plain containers and numpy arrays only) and plan its
    tensors. Returns (config, targets, tensors): `tensors` yields (name, float32 tensor) in `targets` order and
    drops each source array once converted, so the pickle's memory is released while it is written."""
    flat = flatten_params(load_vqgan_pickle(vqgan_path))  # the nested tree is not kept: `flat` owns the arrays
    for key, value in flat.items():
        if np.asarray(value).dtype.kind not in "fiu":
            raise ConversionError(f"{vqgan_path}: {key} has unsupported dtype {np.asarray(value).dtype}")
    config, mapping, targets = vqgan_targets({key: np.shape(value) for key, value in flat.items()}, prefix)

    def tensors():
        for key, name in mapping.items():
            array = np.asarray(flat.pop(key), dtype=np.float32)
            if key.endswith("/kernel") and array.ndim == 4:
                array = array.transpose(3, 2, 0, 1)  # Flax HWIO -> PyTorch OIHW
            yield name, torch.from_numpy(np.ascontiguousarray(array))
            del array

    return config, targets, tensors()


def lapa_config_for(lwm: LWMConfig, vqgan: LWMVQGANConfig, latent_sequence_length: int = 4) -> LAPAConfig:
    """The `LAPAConfig` of the authors' model: LWM backbone, its latent/action blocks as LAPA's token blocks, the
    image placeholder on the vision row after end-of-vision (never a VQGAN code; see `LWMProcessor`)."""
    return LAPAConfig(
        backbone_config=lwm, vqgan_config=vqgan, num_latent_codes=lwm.latent_vocab_size,
        latent_sequence_length=latent_sequence_length, num_action_bins=lwm.action_vocab_size,
        latent_token_offset=lwm.latent_token_offset, action_token_offset=lwm.action_token_offset,
        image_token_id=lwm.vision_token_offset + lwm.end_of_vision_code + 1,
        num_image_tokens=count_image_tokens(lwm, vqgan), pad_token_id=lwm.pad_token_id,
    )


def lwm_processor_for(tokenizer_path: str | os.PathLike, config: LAPAConfig):
    """`LWMProcessor` for `config` with LLaMA-2's tokenizer read from `tokenizer.model` (needs `sentencepiece`)."""
    from processing_lapa import LWMImageProcessor, LWMProcessor, llama_tokenizer_from_sentencepiece

    lwm = config.backbone_config
    tokenizer = llama_tokenizer_from_sentencepiece(tokenizer_path)
    processor = LWMProcessor(
        LWMImageProcessor(size=config.vqgan_config.resolution), tokenizer,
        num_latent_codes=config.num_latent_codes, latent_sequence_length=config.latent_sequence_length,
        num_action_bins=config.num_action_bins, num_image_tokens=config.num_image_tokens,
        text_vocab_size=lwm.text_vocab_size, vision_vocab_size=lwm.vision_vocab_size,
        end_of_vision_code=lwm.end_of_vision_code,
    )
    if processor.image_token_id != config.image_token_id or processor.vocab_size != lwm.vocab_size:
        raise ConversionError("the processor's token layout differs from the model config")
    return processor


def check_lapa_plan(plan: list[Target], config: LAPAConfig):
    """Check that `plan` fills exactly the state dict of `LAPAForActionPrediction(config)` (built on the meta device,
    no memory), with the right shapes; returns that skeleton."""
    from .modeling_lapa import LAPAForActionPrediction

    with torch.device("meta"):
        skeleton = LAPAForActionPrediction(config)
    expected = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    planned = {t.name: tuple(t.shape) for t in plan}
    if expected != planned:
        raise ConversionError(
            f"planned tensors differ from the model: missing {sorted(expected.keys() - planned.keys())}, "
            f"unexpected {sorted(planned.keys() - expected.keys())}, mis-shaped "
            f"{sorted(k for k in expected.keys() & planned.keys() if expected[k] != planned[k])}"
        )
    return skeleton


def convert_lapa(params_path: str | os.PathLike, vqgan_path: str | os.PathLike, output_dir: str | os.PathLike,
                 tokenizer_path: str | os.PathLike | None = None, config: LWMConfig | None = None,
                 dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = "2GB",
                 latent_sequence_length: int = 4) -> LAPAConfig:
    """Write a complete `LAPAForActionPrediction` folder (see the module docstring) from the authors' files.

    Both trees are checked strictly before any tensor data is written (the VQGAN against `LWMVQGANModel`, the params
    against `config`, the union of the names against the model built on the meta device)."""
    from .modeling_lapa import LAPAForActionPrediction
    from transformers.dynamic_module_utils import custom_object_save

    lwm = config if config is not None else LWMConfig(**LAPA_7B_CONFIG)
    vqgan_config, vqgan_part, vqgan_tensors = vqgan_plan(vqgan_path)
    lapa_config = lapa_config_for(lwm, vqgan_config, latent_sequence_length)
    processor = lwm_processor_for(tokenizer_path, lapa_config) if tokenizer_path is not None else None

    index: dict[tuple[str, ...], StreamTensor] = {}
    for tensor in scan_stream(params_path):
        if tensor.key in index:
            raise ConversionError(f"{params_path} holds {tensor.name} more than once")
        index[tensor.key] = tensor
    backbone_plan = conversion_plan({k: t.shape for k, t in index.items()}, lwm, prefix="backbone.")
    plan = vqgan_part + backbone_plan
    skeleton = check_lapa_plan(plan, lapa_config)

    def all_tensors():
        yield from vqgan_tensors
        yield from iter_converted_tensors(backbone_plan, index, lwm, dtype=dtype)

    output_dir = Path(output_dir)
    write_sharded_safetensors(all_tensors(), plan, dtype, output_dir, max_shard_size=max_shard_size)
    lapa_config.architectures = [LAPAForActionPrediction.__name__]
    lapa_config.dtype = dtype
    custom_object_save(skeleton, output_dir, config=lapa_config)  # model code + auto_map["AutoModel"]
    lapa_config.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return lapa_config


def _load_config(spec: str | None, rope_table_dtype: str | None) -> LWMConfig:
    if spec in (None, "lapa-7b"):
        values = dict(LAPA_7B_CONFIG)
    else:
        values = json.loads(Path(spec).read_text())
        values.pop("model_type", None)
    if rope_table_dtype is not None:
        values["rope_table_dtype"] = rope_table_dtype
    return LWMConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="the authors' streaming msgpack params file")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--vqgan", help="the authors' VQGAN pickle: with it the output is a LAPAForActionPrediction "
                                        "folder; without it a bare LWMForCausalLM folder")
    parser.add_argument("--tokenizer", help="LLaMA-2 tokenizer.model: adds the processor (needs --vqgan and the "
                                            "sentencepiece package)")
    parser.add_argument("--latent-sequence-length", type=int, default=4,
                        help="latent codes per action (the released model: 4)")
    parser.add_argument("--config", default="lapa-7b",
                        help="'lapa-7b' (default) or a JSON file of LWMConfig arguments")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="weights dtype (the file is bfloat16: bfloat16 and float32 are exact)")
    parser.add_argument("--rope-table-dtype", choices=["bfloat16", "float32"], default=None,
                        help="RoPE table of the converted model: bfloat16 = the released model's (default for "
                             "lapa-7b), float32 = exact")
    parser.add_argument("--max-shard-size", default="2GB")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = _load_config(args.config, args.rope_table_dtype)
    if args.tokenizer and not args.vqgan:
        parser.error("--tokenizer needs --vqgan (the processor belongs to the complete LAPA folder)")
    if args.vqgan:
        convert_lapa(args.params, args.vqgan, args.output, tokenizer_path=args.tokenizer, config=config,
                     dtype=getattr(torch, args.dtype), max_shard_size=args.max_shard_size,
                     latent_sequence_length=args.latent_sequence_length)
    else:
        convert_params(args.params, args.output, config, dtype=getattr(torch, args.dtype),
                       max_shard_size=args.max_shard_size)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "LAPA_7B_CONFIG",
    "ConversionError",
    "Source",
    "Target",
    "check_param_tree",
    "conversion_plan",
    "convert_lapa",
    "convert_params",
    "lapa_config_for",
    "lwm_processor_for",
    "check_lapa_plan",
    "vqgan_plan",
    "vqgan_targets",
    "expected_param_tree",
    "half_split_to_interleaved",
    "interleaved_to_half_split",
    "iter_converted_tensors",
    "write_sharded_safetensors",
]
