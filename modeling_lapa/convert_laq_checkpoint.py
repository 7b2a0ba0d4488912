"""Convert the authors' latent action quantizer checkpoint (e.g. the released `laq_openx.pt`) into a
`LAPAQuantizerModel` folder that `AutoModel.from_pretrained` loads.

    python -m modeling_lapa.convert_laq_checkpoint --checkpoint laq_openx.pt --output ./lapa-laq-openx

The mapping is strict: every key of the reference state_dict must map onto exactly one of ours (or be one of the
few reference entries that carry no information, checked to be so), and every one of ours must be filled.
Anything else fails the conversion with the offending names. Weights are read without executing code
(`torch.load(weights_only=True)` or safetensors) and written as safetensors.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .configuration_lapa_quantizer import LAPAQuantizerConfig
from .modeling_lapa_quantizer import LAPAQuantizerModel

# The released quantizer's constructor arguments (the reference defaults), used when no --config is given.
REFERENCE_CONSTRUCTOR_KWARGS = dict(
    dim=1024, quant_dim=32, codebook_size=8, image_size=256, patch_size=32, spatial_depth=8, temporal_depth=8,
    dim_head=64, heads=16, code_seq_len=4,
)

_STACKS = {
    "enc_spatial_transformer": "encoder_spatial",
    "enc_temporal_transformer": "encoder_temporal",
    "dec_spatial_transformer": "decoder_spatial",
}
_ATTENTION = {"1": "self_attention", "2": "cross_attention"}
_ATTENTION_PARAMS = {
    "norm.gamma": "norm.weight",
    "context_norm.gamma": "context_norm.weight",
    "to_q.weight": "to_q.weight",
    "to_kv.weight": "to_kv.weight",
    "to_out.weight": "to_out.weight",
    "q_scale": "q_scale",
    "k_scale": "k_scale",
    "null_kv": "null_kv",
}
_FIXED = {
    "to_patch_emb_first_frame.1.weight": "patch_embedding.input_norm.weight",
    "to_patch_emb_first_frame.1.bias": "patch_embedding.input_norm.bias",
    "to_patch_emb_first_frame.2.weight": "patch_embedding.projection.weight",
    "to_patch_emb_first_frame.2.bias": "patch_embedding.projection.bias",
    "to_patch_emb_first_frame.3.weight": "patch_embedding.output_norm.weight",
    "to_patch_emb_first_frame.3.bias": "patch_embedding.output_norm.bias",
    "to_pixels_first_frame.0.weight": "to_pixels.weight",
    "to_pixels_first_frame.0.bias": "to_pixels.bias",
    "vq.codebooks": "quantizer.codebook",
}
_FEED_FORWARD = {"0.weight": "norm.weight", "0.bias": "norm.bias", "1.weight": "fc_in.weight", "4.weight": "fc_out.weight"}


class CheckpointConversionError(ValueError):
    """The reference state_dict does not map onto our model."""


def map_reference_key(key: str) -> tuple[str | None, str | None]:
    """Map one reference key to ours.

    Returns `(our_key, None)` for a weight we keep, `(None, rule)` for a reference entry that carries no information
    (`rule` names the check it must pass), or `(None, None)` when the key is unknown.
    """
    if key in _FIXED:
        return _FIXED[key], None
    if m := re.fullmatch(r"spatial_rel_pos_bias\.net\.(\d)\.(?:0\.)?(weight|bias)", key):
        return f"spatial_position_bias.mlp.{m[1]}.{m[2]}", None
    if m := re.fullmatch(r"vq\.(project_in|project_out)\.(weight|bias)", key):
        return f"quantizer.{m[1]}.{m[2]}", None
    if m := re.fullmatch(r"vq\.cnn_encoder\.(\d+)\.(weight|bias)", key):
        return f"quantizer.downsample.{m[1]}.{m[2]}", None
    if m := re.fullmatch(r"(enc_spatial_transformer|enc_temporal_transformer|dec_spatial_transformer)\.(.+)", key):
        stack, rest = _STACKS[m[1]], m[2]
        if rest == "norm_out.gamma":
            return f"{stack}.norm_out.weight", None
        if rest == "norm_out.beta":
            return None, "zero"
        if m2 := re.fullmatch(r"layers\.(\d+)\.0\.dsconv\.(weight|bias)", rest):
            return f"{stack}.layers.{m2[1]}.position_generator.conv.{m2[2]}", None
        if m2 := re.fullmatch(r"layers\.(\d+)\.3\.(\d\.(?:weight|bias))", rest):
            if m2[2] in _FEED_FORWARD:
                return f"{stack}.layers.{m2[1]}.feed_forward.{_FEED_FORWARD[m2[2]]}", None
            return None, None
        if m2 := re.fullmatch(r"layers\.(\d+)\.([12])\.(.+)", rest):
            layer, which, param = m2[1], m2[2], m2[3]
            if param in ("norm.beta", "context_norm.beta"):
                return None, "zero"  # the reference's non-learned LayerNorm bias buffer
            if which == "1" and param == "context_norm.gamma":
                return None, "unused"  # self-attention never receives a context: this gain is never applied
            if which == "1" and param == "null_kv":
                return None, "empty"  # self-attention has no null key/values: shape (heads, 0, head_dim)
            if param in _ATTENTION_PARAMS:
                return f"{stack}.layers.{layer}.{_ATTENTION[which]}.{_ATTENTION_PARAMS[param]}", None
    return None, None


def convert_state_dict(reference: dict[str, torch.Tensor], config: LAPAQuantizerConfig) -> dict[str, torch.Tensor]:
    """Map a reference state_dict onto `LAPAQuantizerModel(config)`'s, strictly. Raises
    [`CheckpointConversionError`] listing every unknown, unfilled, mis-shaped or non-trivial dropped entry."""
    expected = LAPAQuantizerModel(config).state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected, bad_dropped, shape_errors, duplicates = [], [], [], []
    for key, value in reference.items():
        key = key.removeprefix("module.")
        ours, rule = map_reference_key(key)
        if ours is None:
            if rule is None:
                unexpected.append(key)
            elif rule == "zero" and torch.count_nonzero(value) > 0:
                bad_dropped.append(f"{key} (expected all zeros: the reference uses it as a fixed zero bias)")
            elif rule == "empty" and value.numel() > 0:
                bad_dropped.append(f"{key} (expected an empty tensor, got shape {tuple(value.shape)})")
            continue
        if ours not in expected:
            unexpected.append(f"{key} -> {ours}")
            continue
        if ours in converted:
            duplicates.append(ours)
        if tuple(value.shape) != tuple(expected[ours].shape):
            shape_errors.append(f"{key}: {tuple(value.shape)} vs ours {ours}: {tuple(expected[ours].shape)}")
            continue
        converted[ours] = value.detach().to(torch.float32).clone()
    missing = sorted(set(expected) - set(converted))
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (not part of the reference quantizer): {sorted(unexpected)}")
    if missing:
        problems.append(f"missing keys (our parameters no reference key fills): {missing}")
    if shape_errors:
        problems.append(f"shape mismatches (is --config right?): {shape_errors}")
    if bad_dropped:
        problems.append(f"entries that must be trivial but are not: {bad_dropped}")
    if duplicates:
        problems.append(f"keys filled twice: {sorted(set(duplicates))}")
    if problems:
        raise CheckpointConversionError("Cannot convert the checkpoint strictly:\n  " + "\n  ".join(problems))
    return converted


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from `.safetensors`, or from a PyTorch pickle with `weights_only=True` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types; name the file either way
        raise CheckpointConversionError(
            f"Could not read {path} as a weights-only PyTorch checkpoint: {error}"
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointConversionError(f"{path} does not hold a state_dict (a dict of tensors).")
    return obj


def load_reference_config(path: str | Path | None) -> LAPAQuantizerConfig:
    """Reference constructor arguments from a JSON file (either `{"official_constructor_kwargs": {...}}` or the plain
    dict), or the released model's defaults when `path` is None."""
    if path is None:
        return LAPAQuantizerConfig.from_reference_kwargs(REFERENCE_CONSTRUCTOR_KWARGS)
    data = json.loads(Path(path).read_text())
    kwargs = data.get("official_constructor_kwargs", data)
    return LAPAQuantizerConfig.from_reference_kwargs(kwargs)


def convert_checkpoint(checkpoint: str | Path, output: str | Path, config_path: str | Path | None = None) -> LAPAQuantizerModel:
    """Convert `checkpoint` and write a `save_pretrained` folder (safetensors, config with `auto_map`, model code)."""
    config = load_reference_config(config_path)
    state_dict = convert_state_dict(load_reference_state_dict(checkpoint), config)
    model = LAPAQuantizerModel(config)
    model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(str(output))
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="reference state_dict: .pt/.pth (weights only) or .safetensors")
    parser.add_argument("--output", required=True, help="output folder for save_pretrained")
    parser.add_argument(
        "--config",
        default=None,
        help="JSON of the reference constructor arguments (plain or under 'official_constructor_kwargs'); "
        "default: the released laq_openx.pt sizes",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = convert_checkpoint(args.checkpoint, args.output, args.config)
    except (CheckpointConversionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    print(f"Converted {args.checkpoint} ({n / 1e6:.2f}M parameters) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
