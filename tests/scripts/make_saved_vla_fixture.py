"""Write tests/fixtures/saved_vla/: a tiny LAPA VLA folder saved with this release's code (model, processor and
their remote code) and the predictions it gave when saved (`expected.json`).

`tests/test_saved_folder_compat.py` loads it on whatever transformers is installed and checks the predictions, so
running the suite at both ends of the supported range (`scripts/refresh_lock.sh`, `--oldest`) proves that a folder
saved today keeps loading and predicting on every release in it. Rewrite it only on purpose (a format change):

    python tests/scripts/make_saved_vla_fixture.py
"""

import json
import shutil
import sys
from pathlib import Path

import transformers

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from test_vla_model import INSTRUCTIONS, build, images  # noqa: E402

OUT = TESTS / "fixtures" / "saved_vla"


def main() -> None:
    model, processor = build("llava", seed=7)
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT)
    processor.save_pretrained(OUT)
    frames = images(2, seed=3)
    codes, latent_logits = model.predict_latent_actions(frames, INSTRUCTIONS, return_logits=True)
    actions, action_logits = model.predict_action(frames, INSTRUCTIONS, return_logits=True)
    expected = {
        "saved_with": {"transformers": transformers.__version__},
        "images": {"batch": 2, "seed": 3},
        "instructions": INSTRUCTIONS,
        "latent_codes": codes.tolist(),
        "latent_logits": latent_logits.tolist(),
        "actions": actions.tolist(),
        "action_logits": action_logits.tolist(),
    }
    (OUT / "expected.json").write_text(json.dumps(expected))
    print(f"wrote {OUT} ({sum(f.stat().st_size for f in OUT.iterdir()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
