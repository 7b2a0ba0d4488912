"""A VLA folder saved with this release (tests/fixtures/saved_vla, written by tests/scripts/make_saved_vla_fixture.py)
loads and predicts what it predicted when it was saved, on the installed transformers: with this project, and with
only the code the folder carries (`trust_remote_code=True`, the project blocked). The suite runs at both ends of the
supported range (the lock, and `scripts/refresh_lock.sh --oldest`), so this is the check across releases."""

import json
import textwrap

import numpy as np
import torch
from transformers import AutoModel

import modeling_lapa  # noqa: F401
import processing_lapa  # noqa: F401
from support import FIXTURES, run_without_the_project

FOLDER = FIXTURES / "saved_vla"
EXPECTED = json.loads((FOLDER / "expected.json").read_text())


def frames() -> np.ndarray:
    spec = EXPECTED["images"]
    return np.random.default_rng(spec["seed"]).integers(0, 256, size=(spec["batch"], 40, 48, 3), dtype=np.uint8)


def _check(codes, latent_logits, actions, action_logits):
    assert codes == EXPECTED["latent_codes"]
    torch.testing.assert_close(torch.as_tensor(latent_logits), torch.tensor(EXPECTED["latent_logits"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(action_logits), torch.tensor(EXPECTED["action_logits"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(actions), np.asarray(EXPECTED["actions"]), rtol=0, atol=1e-6)


def test_the_saved_folder_predicts_as_when_it_was_saved():
    model = AutoModel.from_pretrained(FOLDER).eval()
    codes, latent_logits = model.predict_latent_actions(frames(), EXPECTED["instructions"], return_logits=True)
    actions, action_logits = model.predict_action(frames(), EXPECTED["instructions"], return_logits=True)
    _check(codes.tolist(), latent_logits, actions, action_logits)


def test_the_saved_folder_predicts_with_its_own_code_only(tmp_path):
    np.save(tmp_path / "frames.npy", frames())
    script = textwrap.dedent(
        f"""
        import json
        import numpy as np
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(FOLDER)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        images, text = np.load("frames.npy"), {EXPECTED["instructions"]!r}
        codes, latent_logits = model.predict_latent_actions(images, text, return_logits=True)
        actions, action_logits = model.predict_action(images, text, return_logits=True)
        print(json.dumps([codes.tolist(), latent_logits.tolist(), actions.tolist(), action_logits.tolist()]))
        """
    )
    result = run_without_the_project(script, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    _check(*json.loads(result.stdout.strip().splitlines()[-1]))
