"""The authors' JAX VLA (LWM backbone) converted into `LWMForCausalLM`, checked against their own outputs.

Fixtures (`tests/fixtures/lapa_vla/`, verbatim copies of the shared golden data produced by running the authors'
unmodified `latent_pretraining/` code, LAPA @46aca51 with tux @47358b2, at a tiny config):
  tiny_delta_params       the latent-pretraining model's params, as their training saves them (bf16 stream)
  tiny_delta_golden.npz   inputs in their inference layout and fp32 logits of every head at every position
  rope_tables.npz         their RoPE cos/sin tables in fp32 and bf16 model dtype
  tiny_config.json        the byte format, param trees (tiny and the expected 7B), prompt layout and quirks
"""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import torch

from modeling_lapa.convert_lapa_jax import (
    ConversionError,
    check_param_tree,
    conversion_plan,
    convert_params,
    expected_param_tree,
    half_split_to_interleaved,
    interleaved_to_half_split,
    main,
)
from modeling_lapa.jax_stream import bf16_bits_to_float32, iter_stream, scan_stream, write_stream
from modeling_lapa.loading import StrictLoadingError
from modeling_lapa.transformers_compat import cache_kwargs, cache_of
from modeling_lapa.modeling_lwm import (
    LWMConfig,
    LWMForCausalLM,
    LWMRotaryEmbedding,
    official_position_ids,
    official_to_combined_ids,
)

from support import FIXTURES

HERE = FIXTURES / "lapa_vla"
PARAMS = HERE / "tiny_delta_params"
SPEC = json.loads((HERE / "tiny_config.json").read_text())


def tiny_config(**overrides) -> LWMConfig:
    """Our config for the authors' tiny llama_config (tiny_config.json "delta")."""
    official = SPEC["delta"]["llama_config"]
    values = dict(
        text_vocab_size=official["vocab_size"], vision_vocab_size=official["vision_vocab_size"],
        latent_vocab_size=official["delta_vocab_size"], hidden_size=official["hidden_size"],
        intermediate_size=official["intermediate_size"], num_hidden_layers=official["num_hidden_layers"],
        num_attention_heads=official["num_attention_heads"], rms_norm_eps=official["rms_norm_eps"],
        rope_theta=official["theta"], max_position_embeddings=official["max_sequence_length"],
    )
    values.update(overrides)
    return LWMConfig(**values)


def tree_of(listing) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {tuple(entry["key"]): tuple(entry["shape"]) for entry in listing}


@pytest.fixture(scope="module")
def golden():
    return np.load(HERE / "tiny_delta_golden.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny checkpoint converted (float32 weights, several shards) and loaded strictly."""
    out = tmp_path_factory.mktemp("lwm_tiny")
    convert_params(PARAMS, out, tiny_config(), dtype=torch.float32, max_shard_size="400KB")
    model = LWMForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    return out, model


# -- the stream reader ----------------------------------------------------------------------------------------------
def test_stream_reader_agrees_with_plain_msgpack_decoding():
    def array_hook(code, data):
        assert code == 1
        shape, dtype, raw = msgpack.unpackb(data, raw=False)
        return tuple(shape), dtype, raw

    reference = {}
    with open(PARAMS, "rb") as f:
        for key, value in msgpack.Unpacker(f, raw=False, max_buffer_size=0):
            reference[tuple(key)] = msgpack.unpackb(value, ext_hook=array_hook, raw=False)
    index = list(scan_stream(PARAMS))
    assert {t.key for t in index} == set(reference) == set(tree_of(SPEC["delta"]["param_tree"]))
    for tensor in index:
        shape, dtype, raw = reference[tensor.key]
        assert (tensor.shape, tensor.dtype) == (shape, dtype) == (shape, "bfloat16")
        assert tensor.read_raw().tobytes() == raw
        bits = np.frombuffer(raw, np.uint16).reshape(shape)
        assert np.array_equal(tensor.torch().view(torch.int16).numpy().view(np.uint16), bits)  # bf16, bit for bit
        widened = tensor.numpy()
        assert widened.dtype == np.float32 and np.array_equal(torch.from_numpy(widened).bfloat16().float().numpy(),
                                                              widened)
        if len(shape) == 3:  # a stacked kernel: one layer read alone is that layer
            assert np.array_equal(tensor.read_raw(1), tensor.read_raw()[1])
    keys = [key for key, _ in iter_stream(PARAMS)]
    assert keys == [t.key for t in index]


def test_stream_writer_reproduces_the_authors_bytes(tmp_path):
    copy = tmp_path / "params"
    write_stream(copy, ((t.key, (t.read_raw(), t.dtype)) for t in scan_stream(PARAMS)))
    assert copy.read_bytes() == PARAMS.read_bytes()
    assert bf16_bits_to_float32(np.array([0x3F80, 0xC000], np.uint16)).tolist() == [1.0, -2.0]


def test_stream_reader_refuses_a_truncated_file(tmp_path):
    from modeling_lapa.jax_stream import StreamFormatError

    cut = tmp_path / "cut"
    cut.write_bytes(PARAMS.read_bytes()[:200_000])
    with pytest.raises(StreamFormatError, match="truncated"):
        list(scan_stream(cut))


def test_stream_reader_refuses_what_is_not_an_array_entry(tmp_path):
    from modeling_lapa.jax_stream import StreamFormatError

    scalar = tmp_path / "scalar"  # flax encodes numpy scalars as extension 3: not a params tensor
    scalar.write_bytes(msgpack.packb([["step"], msgpack.packb(msgpack.ExtType(3, msgpack.packb(["int32", b"1234"])))]))
    with pytest.raises(StreamFormatError, match="extension code 3"):
        list(scan_stream(scalar))
    plain = tmp_path / "plain"
    plain.write_bytes(msgpack.packb([["step"], msgpack.packb(7)]))
    with pytest.raises(StreamFormatError, match="plain value"):
        list(scan_stream(plain))


# -- exactness against the authors' forward pass --------------------------------------------------------------------
def test_golden_logits_of_every_head_at_every_unpadded_position(converted, golden):
    _, model = converted
    ids = official_to_combined_ids(golden["input_ids"], golden["vision_masks"], golden["delta_masks"],
                                   config=model.config)
    attention_mask = torch.as_tensor(golden["attention_mask"]).long()
    positions = official_position_ids(attention_mask)
    assert np.array_equal(positions.numpy(), golden["position_ids"])  # pads -1, first real token 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, output_hidden_states=True)
    real = golden["attention_mask"][0] > 0
    heads = model.head_logits(out.logits)
    assert set(heads) == {"text", "vision", "latent"}
    errors = {}
    for ours, theirs in (("text", "text_logits"), ("vision", "vision_logits"), ("latent", "delta_logits")):
        assert heads[ours].shape == golden[theirs].shape
        errors[ours] = float(np.abs(heads[ours][0, real].numpy() - golden[theirs][0, real]).max())
    states = [h[0, real].numpy() for h in out.hidden_states]  # embeddings, after layer 0, after the final norm
    errors["input_embeds"] = float(np.abs(states[0] - golden["input_embeds"][0, real]).max())
    errors["layer_0"] = float(np.abs(states[1] - golden["layer_outputs"][0, 0, real]).max())
    errors["final_hidden"] = float(np.abs(states[-1] - golden["final_hidden"][0, real]).max())
    assert errors["input_embeds"] == 0.0, errors  # row lookups of the same bf16 values
    assert max(errors.values()) < 1e-4, errors
    assert torch.isfinite(out.logits).all()  # the pad rows (every key masked) stay finite


def test_sdpa_attention_matches_too(converted, golden):
    folder, _ = converted
    model = LWMForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = official_to_combined_ids(golden["input_ids"], golden["vision_masks"], golden["delta_masks"],
                                   config=model.config)
    attention_mask = torch.as_tensor(golden["attention_mask"]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask,
                       position_ids=official_position_ids(attention_mask), logits_to_keep=8).logits
    latent = model.config.block_slices()["latent"]
    assert np.abs(logits[0, :, latent].numpy() - golden["delta_logits"][0, -8:]).max() < 1e-4


def greedy_latent_ids(model, golden, steps=4):
    """Greedy decoding restricted to the latent block, with the KV cache and the authors' positions; no
    end-of-sequence rule (the latent code 2 is LLaMA's EOS id in their vocabulary)."""
    config = model.config
    latent = config.block_slices()["latent"]
    ids = official_to_combined_ids(golden["prompt_input_ids"], golden["prompt_vision_masks"],
                                   golden["prompt_delta_masks"], config=config)
    attention_mask = torch.as_tensor(golden["prompt_attention_mask"]).long()
    positions = official_position_ids(attention_mask)
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    codes = []
    for step in range(steps):
        code = int(out.logits[0, -1, latent].argmax())
        codes.append(code)
        attention_mask = torch.cat([attention_mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=torch.tensor([[config.latent_token_offset + code]]), attention_mask=attention_mask,
                    position_ids=positions, use_cache=True, logits_to_keep=1, **cache_kwargs(cache_of(out)))
    return codes


def test_raw_greedy_latent_ids_not_the_eos_truncated_ones(converted, golden):
    _, model = converted
    with torch.no_grad():
        codes = greedy_latent_ids(model, golden)
    assert codes == golden["raw_greedy_latent_fp32"][0].tolist() == [3, 2, 2, 0]
    assert golden["official_greedy_latent_fp32"][0].tolist() == [3, 2, 0, 0]  # their sampler stops at code 2 = EOS


def test_teacher_forced_sequence_matches_cached_decoding(converted, golden):
    """The golden teacher-forced sequence (prompt + latent ids [3, 1, 0, 7]) in one pass equals prompt + cache."""
    _, model = converted
    ids = official_to_combined_ids(golden["input_ids"], golden["vision_masks"], golden["delta_masks"],
                                   config=model.config)
    prompt_length = int(golden["prompt_length"])
    attention_mask = torch.as_tensor(golden["attention_mask"]).long()
    positions = official_position_ids(attention_mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions).logits
        first = model(input_ids=ids[:, :prompt_length], attention_mask=attention_mask[:, :prompt_length],
                      position_ids=positions[:, :prompt_length], use_cache=True)
        rest = model(input_ids=ids[:, prompt_length:], attention_mask=attention_mask,
                     position_ids=positions[:, prompt_length:], **cache_kwargs(cache_of(first))).logits
    assert torch.allclose(full[:, prompt_length:], rest, atol=1e-4)


# -- RoPE -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "real"])
def test_rope_tables(size):
    tables = np.load(HERE / "rope_tables.npz")
    if size == "tiny":
        head_dim, rows, max_positions = 16, np.arange(512), 512
    else:
        head_dim, rows, max_positions = 128, tables["rope_real_rows"], 32768
    positions = torch.as_tensor(rows).long()[None]
    for dtype in ("bfloat16", "float32"):
        config = LWMConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=5e7,
                           max_position_embeddings=max_positions, rope_table_dtype=dtype)
        cos, sin = LWMRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
        half = head_dim // 2
        assert torch.equal(cos[..., :half], cos[..., half:])  # half-split layout: frequencies repeated
        name = f"rope_{size}_{'bf16' if dtype == 'bfloat16' else 'f32'}"
        if dtype == "bfloat16":  # the released model's table, exactly
            assert np.array_equal(cos[0, :, :half].numpy(), tables[f"{name}_cos"])
            assert np.array_equal(sin[0, :, :half].numpy(), tables[f"{name}_sin"])
        else:
            # float32 cos/sin of the same float32 angles. XLA's float32 cos loses accuracy at large angles (6e-5 at
            # ~1e3 rad, 2e-4 at ~3e4 rad against float64); torch's is correctly rounded there.
            near = rows < 1024
            assert np.abs(cos[0, near, :half].numpy() - tables[f"{name}_cos"][near]).max() < 1e-4
            assert np.abs(sin[0, :, :half].numpy() - tables[f"{name}_sin"]).max() < 1e-3
    # the authors' left-pad position -1 reads the table's last row (jnp.take wraps)
    config = LWMConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=512)
    rotary = LWMRotaryEmbedding(config)
    cos_pad, _ = rotary(torch.zeros(1), torch.tensor([[-1]]))
    cos_last, _ = rotary(torch.zeros(1), torch.tensor([[511]]))
    assert torch.equal(cos_pad, cos_last)
    with pytest.raises(ValueError, match="position ids"):
        rotary(torch.zeros(1), torch.tensor([[512]]))


def test_rope_row_permutation_turns_interleaved_pairs_into_half_split_pairs():
    head_dim, heads, width = 8, 3, 5
    weight = torch.randn(heads * head_dim, width)
    permuted = interleaved_to_half_split(weight, head_dim)
    assert torch.equal(half_split_to_interleaved(permuted, head_dim), weight)
    # row 2i of each head goes to row i, row 2i+1 to row i + head_dim/2
    assert torch.equal(permuted[head_dim + 1], weight[head_dim + 2])
    assert torch.equal(permuted[head_dim + head_dim // 2 + 1], weight[head_dim + 3])


# -- the param trees ------------------------------------------------------------------------------------------------
def lapa_7b_config(**overrides) -> LWMConfig:
    from modeling_lapa.convert_lapa_jax import LAPA_7B_CONFIG

    return LWMConfig(**{**LAPA_7B_CONFIG, **overrides})


@pytest.mark.parametrize("which", ["latent", "finetuned"])
def test_expected_7b_tree_maps_onto_the_7b_model_with_no_missing_or_unexpected_key(which):
    if which == "latent":
        spec = SPEC["delta"]["real_LAPA_7B_expected_param_tree"]
        config = lapa_7b_config()
    else:
        spec = SPEC["action"]["real_LAPA_finetune_expected_param_tree"]
        config = lapa_7b_config(action_vocab_size=256)
    tree = tree_of(spec["tree"])
    assert expected_param_tree(config) == tree
    assert sum(int(np.prod(s)) for s in tree.values()) == spec["n_params"]
    plan = conversion_plan(tree, config)
    with torch.device("meta"):
        model = LWMForCausalLM(config)
    ours = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert {t.name: t.shape for t in plan} == ours
    assert sum(p.numel() for p in model.parameters()) == spec["n_params"]
    used = {source.key for target in plan for source in target.sources}
    assert used == set(tree)  # every authors' tensor is read


def test_tree_mismatches_are_named():
    config = tiny_config()
    tree = tree_of(SPEC["delta"]["param_tree"])
    assert check_param_tree(tree, config) is True
    broken = dict(tree)
    del broken[("transformer", "dte", "embedding")]
    broken[("transformer", "xte", "embedding")] = (3, 64)
    broken[("lm_head", "kernel")] = (64, 1000)
    with pytest.raises(ConversionError) as error:
        check_param_tree(broken, config)
    message = str(error.value)
    assert "transformer/dte/embedding" in message and "transformer/xte/embedding" in message
    assert "lm_head/kernel: file (64, 1000) vs config (64, 1024)" in message
    with pytest.raises(ConversionError, match="action_vocab_size"):
        check_param_tree(tree_of(SPEC["action"]["param_tree"]), config)


def shrink(shape, config_7b: LWMConfig, config: LWMConfig) -> tuple[int, ...]:
    """A 7B tree shape at the tiny config's sizes."""
    sizes = {config_7b.hidden_size: config.hidden_size, config_7b.intermediate_size: config.intermediate_size,
             config_7b.num_hidden_layers: config.num_hidden_layers, config_7b.text_vocab_size: config.text_vocab_size,
             config_7b.vision_vocab_size: config.vision_vocab_size}
    return tuple(sizes.get(n, n) for n in shape)


@pytest.mark.parametrize("which", ["latent", "finetuned"])
def test_synthetic_stream_with_the_7b_keys_converts(tmp_path, which):
    if which == "latent":
        spec, extra = SPEC["delta"]["real_LAPA_7B_expected_param_tree"], {}
    else:
        spec, extra = SPEC["action"]["real_LAPA_finetune_expected_param_tree"], dict(action_vocab_size=256)
    config_7b = lapa_7b_config(**extra)
    config = LWMConfig(text_vocab_size=96, vision_vocab_size=40, end_of_frame_code=32, end_of_vision_code=33,
                       hidden_size=32, intermediate_size=48,
                       num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64, **extra)
    generator = torch.Generator().manual_seed(0)
    values = {tuple(e["key"]): torch.randn(shrink(e["shape"], config_7b, config), generator=generator).bfloat16()
              for e in spec["tree"]}
    stream = tmp_path / "params"
    write_stream(stream, values.items())
    out = tmp_path / "converted"
    convert_params(stream, out, config, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    model = LWMForCausalLM.from_pretrained(out)  # strict: every key present, none unexpected
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    blocks = config.block_slices()
    # the embedding and the output matrix are the authors' tables and heads, block by block, bit for bit
    assert torch.equal(state["model.embed_tokens.weight"][blocks["vision"]],
                       values[("transformer", "vte", "embedding")])
    assert torch.equal(state["lm_head.weight"][blocks["latent"]], values[("delta_head", "kernel")].t())
    if which == "finetuned":
        assert torch.equal(state["model.embed_tokens.weight"][blocks["action"]],
                           values[("transformer", "ate", "embedding")])
        assert torch.equal(state["lm_head.weight"][blocks["action"]], values[("action_head", "kernel")].t())
    layers = ("transformer", "h", "scan_decoder")
    wq = values[layers + ("attention", "wq", "kernel")][2]
    assert torch.equal(state["model.layers.2.self_attn.q_proj.weight"],
                       interleaved_to_half_split(wq.t(), config.head_dim))
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"],
                       values[layers + ("feed_forward", "w2", "kernel")][1].t())
    assert torch.equal(state["model.layers.0.post_attention_layernorm.weight"],
                       values[layers + ("ffn_norm", "kernel")][0])
    assert torch.equal(state["model.norm.weight"], values[("transformer", "ln_f", "kernel")])


def test_converted_folder_loads_strictly(tmp_path):
    out = tmp_path / "converted"
    convert_params(PARAMS, out, tiny_config())
    assert (out / "model.safetensors").exists()  # one shard under the default size
    with pytest.raises(StrictLoadingError, match="lm_head"):
        LWMForCausalLM.from_pretrained(out, config=tiny_config(latent_vocab_size=9))


def test_cli_converts_the_backbone_alone_without_vqgan(tmp_path):
    config_file = tmp_path / "config.json"
    tiny_config().to_json_file(config_file)  # a saved LWMConfig is a valid --config
    out = tmp_path / "cli"
    assert main(["--params", str(PARAMS), "--output", str(out), "--config", str(config_file),
                 "--rope-table-dtype", "bfloat16"]) == 0
    config = LWMConfig.from_pretrained(out)
    assert config.rope_table_dtype == "bfloat16" and config.vocab_size == 1024 + 8448 + 8
    # The complete LAPA folder (--vqgan, --tokenizer) is tested in test_lapa_7b_folder.py; a processor alone is refused.
    with pytest.raises(SystemExit):
        main(["--params", str(PARAMS), "--output", str(tmp_path / "x"), "--tokenizer", "tokenizer.model"])
    assert not (tmp_path / "x").exists()


def test_bf16_model_with_the_bf16_rope_table_behaves_like_the_authors_bf16_run(converted, golden):
    """The authors serve in bf16, with the bf16-rounded RoPE table. Our bf16 model with that table gives their bf16
    raw greedy ids and their bf16 latent logits up to bf16 arithmetic; the exact table does not."""
    folder, _ = converted
    real = golden["attention_mask"][0] > 0
    errors = {}
    for table in ("bfloat16", "float32"):
        model = LWMForCausalLM.from_pretrained(folder, config=tiny_config(rope_table_dtype=table),
                                               dtype=torch.bfloat16, attn_implementation="eager").eval()
        ids = official_to_combined_ids(golden["input_ids"], golden["vision_masks"], golden["delta_masks"],
                                       config=model.config)
        attention_mask = torch.as_tensor(golden["attention_mask"]).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention_mask,
                           position_ids=official_position_ids(attention_mask)).logits.float()
            codes = greedy_latent_ids(model, golden)
        latent = model.head_logits(logits)["latent"][0, real].numpy()
        errors[table] = float(np.abs(latent - golden["delta_logits_bf16"][0, real]).max())
        if table == "bfloat16":
            assert codes == golden["raw_greedy_latent_bf16"][0].tolist() == [5, 3, 2, 4]
    assert errors["bfloat16"] < 0.25 < 1.0 < errors["float32"], errors


def test_unstacked_layers_convert_the_same(tmp_path, converted):
    """A stream with one key per layer (`transformer/h/<i>/...`, the authors' scan_layers=False) converts to the
    same weights as the stacked one."""
    _, model = converted
    entries = []
    for tensor in scan_stream(PARAMS):
        if tensor.key[:3] == ("transformer", "h", "scan_decoder"):
            for layer in range(tensor.shape[0]):
                key = ("transformer", "h", str(layer)) + tensor.key[3:]
                entries.append((key, (tensor.read_raw(layer), "bfloat16")))
        else:
            entries.append((tensor.key, (tensor.read_raw(), "bfloat16")))
    stream = tmp_path / "params"
    write_stream(stream, entries)
    out = tmp_path / "converted"
    convert_params(stream, out, tiny_config(), dtype=torch.float32)
    unstacked = LWMForCausalLM.from_pretrained(out)
    reference = model.state_dict()
    for name, value in unstacked.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_generate_and_auto_classes(converted):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, _ = converted
    assert isinstance(AutoConfig.from_pretrained(folder), LWMConfig)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, LWMForCausalLM)
    prompt = torch.tensor([[1, 1, 887, 526]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
