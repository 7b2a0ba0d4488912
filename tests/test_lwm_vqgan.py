"""LWM's VQGAN (the LAPA-7B image tokenizer) against golden data written by the authors' JAX code.

Fixtures (copied from the shared golden folder): `tiny_vqgan.pkl` (a tiny LWM VQGAN pickled like the released
`vqgan` file), `tiny_vqgan_golden.npz` (images, official preprocessing, codes, features, decoded image) and
`tiny_config.json` (param trees, including the released model's); `cv2_inter_linear_cases.npz` holds
cv2.resize outputs recorded with OpenCV 4.10 for the preprocessing's resize.

Tolerances achieved on CPU fp32 (asserted with some margin): codes exact; pre-quantisation features 1e-5 abs
(max |ref| ~4); quantized features 2.4e-7; decoded pixels 8.3e-6.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from support import FIXTURES
from modeling_lapa.convert_lwm_vqgan import (
    UnsafePickleError,
    convert_lwm_vqgan,
    load_vqgan_pickle,
    loads_vqgan_pickle,
    main as convert_main,
    model_from_params,
    vqgan_key_map,
    vqgan_state_dict_from_params,
)
from modeling_lapa.loading import StrictLoadingError
from modeling_lapa.vqgan_lwm import LWMVQGANConfig, LWMVQGANModel
from processing_lapa import LWMImageProcessor
from processing_lapa.image_processing_lwm import cv2_linear_resize

OFFICIAL = LWMImageProcessor()  # the authors' preprocessing: 256 px, x / 127.5 - 1


def lwm_preprocess(images) -> torch.Tensor:
    """(3, 256, 256) for one image, (N, 3, 256, 256) for a list."""
    pixels = OFFICIAL(images)["pixel_values"]
    return pixels if isinstance(images, (list, tuple)) else pixels[0]

HERE = FIXTURES / "lapa_vla"
PICKLE = HERE / "tiny_vqgan.pkl"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(HERE / "tiny_vqgan_golden.npz"))


@pytest.fixture(scope="module")
def params():
    return load_vqgan_pickle(PICKLE)


@pytest.fixture(scope="module")
def model(params):
    torch.set_num_threads(1)
    return model_from_params(params)


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------- golden numerics
def test_config_is_read_from_the_param_tree(model):
    c = model.config
    assert (c.hidden_channels, tuple(c.channel_mult), c.num_res_blocks) == (32, (1, 1, 1, 1, 2), 2)
    assert (c.z_channels, c.quantized_embed_dim, c.num_embeddings) == (64, 64, 1024)
    assert c.to_diff_dict() == LWMVQGANConfig.from_preset("tiny").to_diff_dict()


@pytest.mark.parametrize("which", ["square", "nonsquare"])
def test_golden_codes_are_exact_through_the_official_preprocessing(model, golden, which):
    image = golden[f"image_{which}_uint8"]
    pixels = lwm_preprocess(image)  # (3, 256, 256) in [-1, 1]
    assert pixels.shape == (3, 256, 256) and pixels.dtype == torch.float32
    if which == "square":
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), golden["pixels_square"][0])  # bit-identical
    else:  # 240x320: LongestMaxSize(256) -> 192x256, then Resize(256, 256), both cv2 INTER_LINEAR on uint8
        assert np.array_equal(OFFICIAL.resize(image), golden["image_nonsquare_resized_uint8"])
    with torch.no_grad():
        codes, quantized = model.encode(pixels[None])
        latents = model.encode_latents(pixels[None])
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.int64
    assert quantized.shape == (1, 64, 16, 16)
    assert np.array_equal(codes.reshape(-1).numpy(), golden[f"codes_{which}"])  # row-major, 256 vision tokens
    np.testing.assert_allclose(nhwc(latents), golden[f"prequant_{which}"], rtol=0, atol=3e-5)
    np.testing.assert_allclose(nhwc(quantized), golden[f"quantized_{which}"], rtol=0, atol=1e-6)


def test_batch_and_video_shapes_give_the_same_codes(model, golden):
    pixels = torch.stack([lwm_preprocess(golden["image_square_uint8"]),
                          lwm_preprocess(golden["image_nonsquare_uint8"])])
    with torch.no_grad():
        codes, _ = model.encode(pixels)
        video_codes, video_q = model.encode(pixels[None])  # (B=1, T=2, 3, 256, 256)
        out = model(pixels)
    expected = np.stack([golden["codes_square"], golden["codes_nonsquare"]]).reshape(2, 16, 16)
    assert np.array_equal(codes.numpy(), expected)
    assert video_codes.shape == (1, 2, 16, 16) and video_q.shape == (1, 2, 64, 16, 16)
    assert torch.equal(video_codes[0], codes) and torch.equal(out.codes, codes)


def test_decode_matches_the_golden_image(model, golden):
    codes = torch.from_numpy(golden["codes_square"].astype(np.int64))
    with torch.no_grad():
        pixels = model.decode(codes.reshape(1, 16, 16))
        flat = model.decode(codes[None])  # the 256 flattened vision tokens
    assert pixels.shape == (1, 3, 256, 256) and pixels.min() >= -1 and pixels.max() <= 1
    np.testing.assert_allclose(nhwc(pixels), golden["decoded_square"], rtol=0, atol=5e-5)
    assert torch.equal(flat, pixels)
    with pytest.raises(ValueError, match=r"\[0, 1023\]"):
        model.decode(torch.full((1, 16, 16), 1024))


def test_argmin_ties_go_to_the_lowest_index(params):
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    codebook = params["quantize"]["embeddings"].copy()
    codebook[1000] = codebook[5]  # entry 1000 duplicates entry 5
    tree["quantize"] = {"embeddings": codebook}
    tied = model_from_params(tree)
    z = torch.from_numpy(codebook[[5, 1000, 7]])
    assert tied.quantize.codes(z).tolist() == [5, 5, 7]


# ------------------------------------------------------------------------------------------------ preprocessing
def test_resize_matches_recorded_cv2_outputs():
    # cv2.resize(INTER_LINEAR) outputs recorded with opencv-python-headless 4.10 (up/downscales, odd widths,
    # border rows, the exact-2x area path); OpenCV is not a dependency.
    cases = np.load(HERE / "cv2_inter_linear_cases.npz")
    n = sum(name.startswith("in_") for name in cases.files)
    assert n >= 7
    for i in range(n):
        image, expected = cases[f"in_{i}"], cases[f"out_{i}"]
        assert np.array_equal(cv2_linear_resize(image, *expected.shape[:2]), expected), (image.shape, expected.shape)


def test_resize_matches_live_cv2_where_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w, nh, nw = (int(v) for v in rng.integers(2, 300, 4))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(cv2_linear_resize(image, nh, nw), expected), ((h, w), (nh, nw))


def test_preprocess_inputs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    out = lwm_preprocess([image, torch.from_numpy(image).permute(2, 0, 1)])  # numpy HWC, torch CHW
    assert out.shape == (2, 3, 256, 256) and torch.equal(out[0], out[1])
    assert out.min() >= -1 and out.max() <= 1
    from PIL import Image

    assert torch.equal(lwm_preprocess(Image.fromarray(image)), out[0])
    # an exact 2x downscale takes cv2's area fast path: the rounded mean of each 2 x 2 block
    big = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    means = (big.reshape(256, 2, 256, 2, 3).astype(int).sum((1, 3)) + 2) // 4
    assert np.array_equal(OFFICIAL.resize(big), means)
    with pytest.raises(ValueError, match="float images must hold finite values in"):
        lwm_preprocess(image.astype(np.float32))  # 0..255 floats: not an image in [0, 1]


# ------------------------------------------------------------------------------------- save / load and Auto classes
def test_save_load_round_trip_is_exact_and_strict(model, golden, tmp_path):
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and "vqgan_lwm.py" in files and "loading.py" in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lwm_vqgan"
    assert config["auto_map"]["AutoModel"] == "vqgan_lwm.LWMVQGANModel"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LWMVQGANConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is LWMVQGANModel
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        codes, _ = loaded.encode(nchw(golden["pixels_square"]))
    assert np.array_equal(codes.reshape(-1).numpy(), golden["codes_square"])

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["decoder.up.0.resample.conv.bias"]
    state["stray.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StrictLoadingError) as error:
        LWMVQGANModel.from_pretrained(tmp_path)
    assert "decoder.up.0.resample.conv.bias" in str(error.value) and "stray.weight" in str(error.value)


def test_converter_cli_and_remote_code(golden, tmp_path):
    out = tmp_path / "vqgan"
    assert convert_main(["--vqgan", str(PICKLE), "--output", str(out), "--preset", "tiny"]) == 0
    np.save(tmp_path / "pixels.npy", golden["pixels_square"])
    script = f"""
import sys
sys.modules["modeling_lapa"] = None  # the project cannot be imported, even if installed
import numpy as np, torch
from transformers import AutoModel
torch.set_num_threads(1)
model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x = torch.from_numpy(np.load({str(tmp_path / 'pixels.npy')!r})).permute(0, 3, 1, 2)
with torch.no_grad():
    print(model.encode(x)[0].reshape(-1).tolist())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == golden["codes_square"].tolist()


# ------------------------------------------------------------------------------------------ conversion strictness
def test_state_dict_mapping_is_strict(params):
    flat_state = vqgan_state_dict_from_params(params)
    assert flat_state["encoder.conv_in.weight"].shape == (32, 3, 3, 3)  # HWIO -> OIHW
    assert torch.equal(flat_state["encoder.conv_in.weight"],
                       torch.from_numpy(params["encoder"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1))
    assert torch.equal(flat_state["decoder.norm_out.weight"], torch.from_numpy(params["decoder"]["GroupNorm_0"]["scale"]))

    extra = {**params, "encoder": {**params["encoder"], "Stray_0": {"kernel": np.zeros((1, 1, 1, 1), np.float32)}}}
    with pytest.raises(KeyError, match="encoder/Stray_0/kernel"):
        vqgan_state_dict_from_params(extra)
    missing = {**params, "post_quant_conv": {"kernel": params["post_quant_conv"]["kernel"]}}
    with pytest.raises(KeyError, match=r"post_quant_conv\.bias"):
        vqgan_state_dict_from_params(missing)
    with pytest.raises(ValueError, match="quantize/embeddings"):
        vqgan_state_dict_from_params(params, LWMVQGANConfig.from_preset("tiny", num_embeddings=512))


def test_released_7b_tree_maps_onto_the_released_preset():
    tree = json.loads((HERE / "tiny_config.json").read_text())["vqgan"]["real_param_tree"]
    released = LWMVQGANConfig.from_preset("released")
    assert LWMVQGANConfig.from_param_shapes(tree).to_diff_dict() == released.to_diff_dict()
    assert LWMVQGANConfig().to_diff_dict() == released.to_diff_dict()  # the defaults are the released sizes
    mapping = vqgan_key_map(tree, released)
    assert len(mapping) == len(tree) == 277
    with torch.device("meta"):
        assert sum(p.numel() for p in LWMVQGANModel(released).parameters()) == 146_244_675  # the 585 MB file


# ------------------------------------------------------------------------------------------ restricted unpickler
class _Custom:
    pass


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.path.join(os.getcwd(), 'PWNED')}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unpickler_reads_numpy_trees_of_every_protocol(protocol):
    tree = {"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3), "h": np.ones(3, np.float16),
                  "f": np.asfortranarray(np.ones((2, 3))), "s": np.float32(2.5)}, "l": [1, 2.0, "x", (1, b"")]}
    loaded = loads_vqgan_pickle(pickle.dumps(tree, protocol=protocol))
    for key, value in tree["a"].items():
        assert np.array_equal(loaded["a"][key], value) and np.asarray(loaded["a"][key]).dtype == np.asarray(value).dtype
    assert loaded["l"] == tree["l"]


@pytest.mark.parametrize(
    "payload, name",
    [
        (_Evil(), "system"),
        ({"encoder": {"Conv_0": _Evil()}}, "system"),
        ({"params": _Custom()}, "_Custom"),
        (np.array([1, "a"], dtype=object), "object"),
    ],
)
def test_unpickler_refuses_code_and_foreign_classes(tmp_path, monkeypatch, payload, name):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "vqgan"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafePickleError, match=name):
        load_vqgan_pickle(path)
    with pytest.raises(UnsafePickleError):
        convert_lwm_vqgan(path)
    assert not (tmp_path / "PWNED").exists()


def test_unpickler_refuses_a_hand_written_exec_pickle():
    # GLOBAL builtins.exec + REDUCE: what a malicious "vqgan" file would contain
    data = b"cbuiltins\nexec\n(Vprint('pwned')\ntR."
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        loads_vqgan_pickle(data)


def test_vqgan_variants_with_attention_are_refused_clearly():
    from modeling_lapa.vqgan_lwm import LWMVQGANConfig

    with pytest.raises(ValueError, match="unsupported VQGAN variant with attention blocks"):
        LWMVQGANConfig(attn_resolutions=[16])
    with pytest.raises(ValueError, match="unsupported VQGAN: its param tree has attention blocks"):
        LWMVQGANConfig.from_param_shapes({"encoder/Conv_0/kernel": (3, 3, 3, 32), "encoder/mid/AttnBlock_0/q": (1,)})
