"""Merge a LoRA adapter written by `training/pretrain.py` or `training/finetune.py` (`--lora`) into its base model and
write a plain LAPA checkpoint (model + processor), loadable with `AutoModel.from_pretrained` and without peft.

    python -m training.merge_lora --adapter runs/lapa_ft/adapter --output runs/lapa_ft/merged

The base is the one recorded in the adapter (`base_model_name_or_path`: the run's `<output_dir>/base` or its
`--init-from` model); `--base` overrides it. The processor saved with the adapter (it holds the action statistics
fitted during the run) is written next to the merged weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def load_lora_model(adapter: str | Path, base: str | Path | None = None):
    """(peft model, processor) from an adapter folder; the LAPA base model is loaded strictly."""
    from peft import PeftModel
    from transformers import AutoProcessor

    import modeling_lapa  # noqa: F401  (registers the Auto classes)
    import processing_lapa  # noqa: F401
    from modeling_lapa import LAPAForActionPrediction

    adapter = Path(adapter)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    base = base or json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} names no base model; pass --base")
    model = LAPAForActionPrediction.from_pretrained(base, load_processor=False)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    processor = AutoProcessor.from_pretrained(str(adapter))
    # The chunk size travels with the adapter's processor: a run with --action-chunk-size k from a single-step (or
    # latent-pretrained) --init-from model trained k-action chunks on a base whose saved config still says 1.
    model.config.action_chunk_size = getattr(processor, "action_chunk_size", 1)
    model.processor = processor
    return peft_model, processor


def merge_lora(adapter: str | Path, output: str | Path, base: str | Path | None = None):
    """Merge and save; returns the merged `LAPAForActionPrediction` (with its processor attached)."""
    peft_model, processor = load_lora_model(adapter, base)
    merged = peft_model.merge_and_unload()
    merged.processor = processor
    output = Path(output)
    merged.save_pretrained(str(output))
    processor.save_pretrained(str(output))
    training_config = Path(adapter) / "training_config.json"
    if training_config.is_file():
        (output / "training_config.json").write_text(training_config.read_text())
    return merged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder written by a --lora run")
    parser.add_argument("--output", required=True, help="folder of the merged checkpoint")
    parser.add_argument("--base", default=None, help="base LAPA model folder (default: the adapter's record)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        merge_lora(args.adapter, args.output, args.base)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
