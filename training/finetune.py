"""Action finetuning (stage 3 of LAPA): the latent-pretrained model learns to emit robot actions, each dimension a
token among N quantile bins fitted on the finetuning data (the paper's action head replaces the latent head).

    accelerate launch training/finetune.py --preset tiny --init-from runs/lapa/model --dataset outputs/metaworld \
        --train-episodes-per-task 5 --output-dir runs/lapa_ft
    accelerate launch training/finetune.py --preset smolvlm --init-from runs/lapa/model --dataset my/robot_data

Without `--init-from` the untrained backbone is finetuned: the paper's SCRATCH baseline. The action tokenizer's bin
statistics are fitted on the training split and stored inside the saved processor under the dataset's name
(`--gripper-dims 3` makes dimension 3 a binary gripper). Presets: `tiny` (CPU) and `smolvlm` (LoRA on GPUs). Full
training or `--lora` (peft; the new token rows train and are saved with the adapter). `--resume` continues exactly.
"""

import sys

from training.vla_training import build_parser as _stage_parser, run


def build_parser():
    return _stage_parser("finetune", __doc__)


def main(argv=None) -> int:
    return run("finetune", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
