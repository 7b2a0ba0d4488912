"""Latent pretraining (stage 2 of LAPA): a vision-language model learns to predict the latent actions of the
labelled frames from (image, instruction).

    accelerate launch training/pretrain.py --preset tiny --dataset outputs/quickstart/labelled --output-dir runs/lapa
    accelerate launch --multi_gpu --num_processes 8 training/pretrain.py --preset smolvlm --dataset my/labelled --lora

Targets are the `latent_action` column written by `training/label_latents.py`; each latent position is a softmax
over the |C| latent tokens only (the paper's latent head). `--target action` trains on ground-truth actions instead:
the paper's ACTIONVLA baseline. Presets: `tiny` (a LLaVA-style model built in code, CPU) and `smolvlm`
(HuggingFaceTB/SmolVLM-256M-Instruct on GPUs, bf16). Full training by default (the vision encoder frozen, as in the
paper) or `--lora`. Settings: preset <- `--config` YAML <- command line; unknown keys are errors. `--resume`
continues exactly from the latest checkpoint in `--output-dir`. The model and its processor are saved together in
`<output_dir>/model` (LoRA: `<output_dir>/adapter`, see `python -m training.merge_lora`).
"""

import sys

from training.vla_training import build_parser as _stage_parser, run


def build_parser():
    return _stage_parser("pretrain", __doc__)


def main(argv=None) -> int:
    return run("pretrain", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
