"""One process may chain training stages with different mixed precision (the paper experiment: fp32 VLA stages, then
a bf16 quantizer); Accelerate alone refuses the second."""

from types import SimpleNamespace

from training.engine import TrainingEngine


def _config(tmp_path, mixed_precision):
    return SimpleNamespace(output_dir=str(tmp_path / mixed_precision), mixed_precision=mixed_precision,
                           gradient_accumulation_steps=1, report_to="none", resume=False)


def test_stages_with_other_mixed_precision_run_in_one_process(tmp_path):
    first = TrainingEngine(_config(tmp_path, "no"), name="fp32 stage")
    assert first.accelerator.mixed_precision == "no"
    second = TrainingEngine(_config(tmp_path, "bf16"), name="bf16 stage")
    assert second.accelerator.mixed_precision == "bf16"
    assert TrainingEngine(_config(tmp_path, "no"), name="again").accelerator.mixed_precision == "no"
