"""Convert LWM's VQGAN (the released LAPA-7B / LWM `vqgan` file) into [`LWMVQGANModel`], without JAX.

The released file is a Python pickle of the Flax param dict (top keys decoder, encoder, post_quant_conv,
quant_conv, quantize) holding fp32 arrays. A pickle can run arbitrary code when loaded, so it is read with a
restricted unpickler that builds only plain containers (dict, list, tuple, ...) and numpy arrays / dtypes / scalars
through numpy's own reconstruction helpers; any other class or function named in the file is refused with
`UnsafePickleError`, before anything is called.

    python -m modeling_lapa.convert_lwm_vqgan --vqgan PATH/vqgan --output DIR --preset released

Python API: `load_vqgan_pickle`, `flatten_params`, `vqgan_key_map`, `vqgan_state_dict_from_params`,
`model_from_params`, `convert_lwm_vqgan`.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .vqgan_lwm import LWMVQGANConfig, LWMVQGANModel


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a class or function outside the allow-list; nothing from it was executed."""


# ------------------------------------------------------------------------------------------- restricted unpickler
def _refuse_object_dtype(dtype: np.dtype, where: str) -> np.dtype:
    if dtype.hasobject:
        raise UnsafePickleError(f"{where}: numpy arrays of Python objects (dtype {dtype}) are refused.")
    return dtype


def _safe_dtype(*args):
    """numpy.dtype(...) as pickled by numpy, refusing object dtypes."""
    return _refuse_object_dtype(np.dtype(*args), "numpy.dtype")


def _safe_reconstruct(subtype, shape, dtype):
    """numpy's `_reconstruct(ndarray, shape, dtype)`; the array's data comes with the following BUILD
    (ndarray.__setstate__)."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} refused (only numpy.ndarray).")
    dtype = dtype if isinstance(dtype, np.dtype) else _safe_dtype(dtype)
    return np.ndarray.__new__(np.ndarray, shape, _refuse_object_dtype(dtype, "numpy _reconstruct"))


def _safe_frombuffer(buffer, dtype, shape, order):
    """numpy's `_frombuffer` (pickle protocol 5 arrays)."""
    dtype = _refuse_object_dtype(np.dtype(dtype), "numpy _frombuffer")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order).copy(order="A")


def _safe_scalar(dtype, data=None):
    """numpy's `scalar(dtype, bytes)` (numpy scalars such as np.float32(1.0))."""
    dtype = _refuse_object_dtype(np.dtype(dtype), "numpy scalar")
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar without raw bytes refused.")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _safe_latin1_encode(text, encoding="utf-8"):
    """`_codecs.encode(str, "latin1")`: how pickle protocols 0-2 store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} refused (only latin1 bytes of pickle protocol <3).")
    return text.encode("latin1")


def _safe_bytes(*args):
    """`bytes()` / `bytes(b"...")` as pickle protocols < 3 write empty or small byte strings."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise UnsafePickleError("bytes(...) with non-bytes arguments refused.")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED: dict[tuple[str, str], object] = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "bytes"): _safe_bytes,
    ("collections", "OrderedDict"): dict,
    ("_codecs", "encode"): _safe_latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
}
for _module in _NUMPY_MODULES:
    _ALLOWED[(_module, "_reconstruct")] = _safe_reconstruct
    _ALLOWED[(_module, "scalar")] = _safe_scalar
# numpy's scalar type classes appear as `numpy.dtype` arguments' types in some pickles (e.g. numpy.float32).
for _name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "bool_"):
    _ALLOWED[("numpy", _name)] = getattr(np, _name)


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the allow-listed globals above (containers and numpy array
    reconstruction), each mapped to a checked stand-in. Persistent ids and extension codes are refused too."""

    def find_class(self, module: str, name: str):
        if module in ("__builtin__", "copy_reg"):  # Python 2 names written by pickle protocols < 3
            module = {"__builtin__": "builtins", "copy_reg": "copyreg"}[module]
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            hint = ""
            if module.split(".")[0] in ("jax", "jaxlib", "flax"):
                hint = (" The file holds JAX/Flax objects; re-save it as a dict of numpy arrays (e.g. "
                        "jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(params))) where JAX is installed.")
            raise UnsafePickleError(
                f"refusing to load {module}.{name} from the pickle: only plain containers and numpy arrays are "
                f"allowed (this file may run code when loaded with plain pickle).{hint}"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r} in the pickle.")


def load_vqgan_pickle(path) -> dict:
    """Read LWM's pickled VQGAN params safely. Returns the nested dict of numpy arrays as stored
    (top keys decoder, encoder, post_quant_conv, quant_conv, quantize). Raises `UnsafePickleError` naming the
    class or function if the file refers to anything but containers and numpy arrays."""
    with open(path, "rb") as handle:
        tree = RestrictedUnpickler(handle).load()
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a pickled dict of params, got {type(tree).__name__}.")
    return tree


def loads_vqgan_pickle(data: bytes) -> dict:
    """`load_vqgan_pickle` for bytes in memory."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ------------------------------------------------------------------------------------------------- key mapping
def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {'a/b/c': array}. An already flat dict with '/'-joined keys is returned unchanged."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, path))
        else:
            flat[path] = value
    return flat


def _target_name(key: str) -> str | None:
    """Flax key path -> (PyTorch parameter name without the weight/bias leaf) or None if unknown."""
    rules = [
        (r"encoder/Conv_0", "encoder.conv_in"),
        (r"encoder/Conv_1", "encoder.conv_out"),
        (r"encoder/GroupNorm_0", "encoder.norm_out"),
        (r"decoder/Conv_0", "decoder.conv_in"),
        (r"decoder/Conv_1", "decoder.conv_out"),
        (r"decoder/GroupNorm_0", "decoder.norm_out"),
        (r"quant_conv", "quant_conv"),
        (r"post_quant_conv", "post_quant_conv"),
        (r"(encoder|decoder)/MidBlock_0/ResnetBlock_(\d+)/(\w+)", r"\1.mid.block.\2.\3"),
        (r"encoder/DownsamplingBlock_(\d+)/ResnetBlock_(\d+)/(\w+)", r"encoder.down.\1.block.\2.\3"),
        (r"encoder/DownsamplingBlock_(\d+)/Downsample_0/Conv_0", r"encoder.down.\1.resample.conv"),
        (r"decoder/UpsamplingBlock_(\d+)/ResnetBlock_(\d+)/(\w+)", r"decoder.up.\1.block.\2.\3"),
        (r"decoder/UpsamplingBlock_(\d+)/Upsample_0/Conv_0", r"decoder.up.\1.resample.conv"),
    ]
    sublayer = {"Conv_0": "conv1", "Conv_1": "conv2", "Conv_2": "nin_shortcut", "GroupNorm_0": "norm1",
                "GroupNorm_1": "norm2"}
    for pattern, replacement in rules:
        match = re.fullmatch(pattern, key)
        if match:
            name = match.expand(replacement)
            if "block." in name:  # ResnetBlock sub-layer
                head, last = name.rsplit(".", 1)
                if last not in sublayer:
                    return None
                name = f"{head}.{sublayer[last]}"
            return name
    return None


def _torch_name(key: str) -> str | None:
    """Flax key path ('encoder/DownsamplingBlock_0/ResnetBlock_0/Conv_0/kernel') -> model parameter name."""
    if key == "quantize/embeddings":
        return "quantize.embedding.weight"
    module, _, leaf = key.rpartition("/")
    target = _target_name(module)
    if target is None or leaf not in ("kernel", "bias", "scale"):
        return None
    return f"{target}.{'bias' if leaf == 'bias' else 'weight'}"


def _torch_shape(key: str, shape: tuple) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if key.endswith("/kernel") and len(shape) == 4 else tuple(shape)


def vqgan_key_map(shapes: Mapping, config: LWMVQGANConfig | None = None) -> dict[str, str]:
    """Check a Flax VQGAN tree's key paths and shapes ('/'-joined path -> shape; arrays work too) against
    [`LWMVQGANModel`] built from `config` (default: read from the shapes) and return {flax key: model key}.

    Strict: every source key must map to a model parameter and every model parameter must be filled, with the
    right shape (Conv kernels HWIO become OIHW); otherwise `KeyError` / `ValueError` names the leftovers."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in flatten_params(shapes).items()}
    if config is None:
        config = LWMVQGANConfig.from_param_shapes(shapes)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LWMVQGANModel(config).state_dict().items()}
    mapping, unknown, doubled = {}, [], []
    for key in shapes:
        name = _torch_name(key)
        if name is None:
            unknown.append(key)
        elif name in mapping.values():
            doubled.append(f"{key} -> {name}")
        else:
            mapping[key] = name
    missing = sorted(set(expected) - set(mapping.values()))
    unexpected = sorted(f"{k} -> {v}" for k, v in mapping.items() if v not in expected)
    if unknown or missing or unexpected or doubled:
        raise KeyError(
            "LWM VQGAN params do not match LWMVQGANModel: "
            + "; ".join(
                f"{label}: {keys}"
                for label, keys in (
                    ("unused source keys", sorted(unknown)),
                    ("model keys not filled", missing),
                    ("mapped keys the model does not have", unexpected),
                    ("source keys mapping onto the same model key", sorted(doubled)),
                )
                if keys
            )
        )
    wrong = [
        f"{key} {shapes[key]} -> {name} {_torch_shape(key, shapes[key])} vs model {expected[name]}"
        for key, name in mapping.items()
        if _torch_shape(key, shapes[key]) != expected[name]
    ]
    if wrong:
        raise ValueError("LWM VQGAN param shapes do not match the model: " + "; ".join(sorted(wrong)))
    return mapping


def vqgan_state_dict_from_params(tree: Mapping, config: LWMVQGANConfig | None = None) -> dict[str, torch.Tensor]:
    """Map LWM's Flax VQGAN param tree (nested or '/'-flat dict of arrays) onto [`LWMVQGANModel`]'s state dict,
    strictly (see `vqgan_key_map`): Conv kernels HWIO -> OIHW, GroupNorm scale -> weight, biases as they are,
    `quantize/embeddings` -> `quantize.embedding.weight`; all fp32."""
    flat = flatten_params(tree)
    for key, value in flat.items():
        if np.asarray(value).dtype.kind not in "fiu":
            raise ValueError(f"{key}: unsupported dtype {np.asarray(value).dtype}.")
    mapping = vqgan_key_map(flat, config)
    state = {}
    for key, name in mapping.items():
        array = np.asarray(flat[key])
        if key.endswith("/kernel"):
            array = array.transpose(3, 2, 0, 1)
        state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return state


def model_from_params(tree: Mapping, config: LWMVQGANConfig | None = None) -> LWMVQGANModel:
    """Build an [`LWMVQGANModel`] (eval mode, fp32) holding the given Flax params."""
    flat = flatten_params(tree)
    if config is None:
        config = LWMVQGANConfig.from_param_shapes({k: np.shape(v) for k, v in flat.items()})
    state = vqgan_state_dict_from_params(flat, config)
    model = LWMVQGANModel(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_lwm_vqgan(vqgan_path, output_dir=None, preset: str | None = None) -> LWMVQGANModel:
    """Read LWM's pickled `vqgan` file safely and return the model; with `output_dir`, also `save_pretrained`
    it there (safetensors + config + remote code). `preset="released"` checks the file against the released
    sizes instead of reading them from the file."""
    tree = load_vqgan_pickle(vqgan_path)
    config = LWMVQGANConfig.from_preset(preset) if preset else None
    model = model_from_params(tree, config)
    del tree
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vqgan", required=True, help="LWM / LAPA-7B pickled VQGAN params (the `vqgan` file)")
    parser.add_argument("--output", required=True, help="output folder for save_pretrained")
    parser.add_argument("--preset", choices=["released", "tiny"], default=None,
                        help="check the file against these sizes (default: read the sizes from the file)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model = convert_lwm_vqgan(args.vqgan, args.output, preset=args.preset)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: LWMVQGANModel, {n:,} parameters, {model.config.num_embeddings} codes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
