"""quantize("int8") and quantize("int4"): weight-only integers with torch's CPU kernels (quantization.py)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from acip.hub.quantization import IntLinear, quantize_int4, quantize_int8
from conftest import tiny_acip_model, token_ids

# Relative logit error (Frobenius) of a quantized tiny model against its float32 form: int8 with bf16 activations
# stays under 2% (measured ≤ 0.6%), int4 with groups of 64 under 15% (measured ≤ 7%) on random tiny models.
TOLERANCE = {"int8": 0.02, "int4": 0.15}


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("quant_type", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 48), (100, 33), (7, 5), (576, 17)])
def test_layer_matches_its_dequantized_weight(quant_type, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(*shape)
    layer = IntLinear.from_linear(linear, quant_type)
    x = torch.randn(3, 2, shape[0])
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
        got = layer(x)
    assert got.shape == (3, 2, shape[1])
    assert relative_error(got, expected) < 0.01  # only bf16 activations apart
    step = {"int8": 1 / 127, "int4": 1 / 7.5}[quant_type]  # a rounding step, relative to a row's (group's) range
    assert float((layer.dequantized() - linear.weight.detach()).abs().max()) <= step * float(linear.weight.abs().max())


def test_int4_kernel_layout_saves_the_portable_layout():
    torch.manual_seed(0)
    layer = IntLinear.from_linear(torch.nn.Linear(100, 40), "int4")
    portable = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        y = layer(torch.randn(2, 100))
    assert layer.kernel_layout
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in portable.items())
    again = IntLinear(100, 40, True, "int4")
    again.load_state_dict(portable)
    with torch.no_grad():
        assert torch.equal(again(torch.randn(2, 100).fill_(0) + 0), again(torch.zeros(2, 100)))
        torch.testing.assert_close(layer.dequantized(), again.dequantized())
    assert y.shape == (2, 40)


def test_quantizers_pad_to_the_kernels_shapes():
    q, scale = quantize_int8(torch.randn(5, 17))
    assert q.shape == (5, 32) and scale.shape == (5,) and q.dtype == torch.int8 and scale.dtype == torch.bfloat16
    q, scale_zero = quantize_int4(torch.randn(5, 17))
    assert q.shape == (16, 32) and scale_zero.shape == (1, 16, 2) and q.dtype == torch.uint8


@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_quantized_model_is_close_and_reloads(kind, quant_type, tmp_path):
    model = tiny_acip_model(kind).prune_model_by_score(0.6).compress()
    reference = logits(model)
    assert model.quantize(quant_type) is model
    quantized = logits(model)
    assert relative_error(quantized, reference) < TOLERANCE[quant_type]
    assert model.get_size_ratio() >= 0.6  # balanced plain factors hold more weights than the aligned pair
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert reloaded.config.int_quantization == model.config.int_quantization
    torch.testing.assert_close(logits(reloaded), quantized, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # tied and untied embeddings
def test_the_head_is_int8_and_a_tied_embedding_reads_it(kind, tmp_path):
    from acip.hub.quantization import TiedIntEmbedding

    model = tiny_acip_model(kind).prune_model_by_score(0.6).compress()
    tied = model.config.text_config.tie_word_embeddings
    embedding = model.get_input_embeddings().weight.detach().clone()
    params = model.get_num_params(full=True)
    model.quantize("int8")  # int8 keeps the aligned pairs: the same parameter count
    head = model.get_output_embeddings()
    assert isinstance(head, IntLinear) and head.quant_type == "int8"
    assert model.config.int_quantization["head"] == "lm_head"
    assert model.get_num_params(full=True) == params
    if tied:
        assert isinstance(model.get_input_embeddings(), TiedIntEmbedding)
        assert not any("embed_tokens" in key for key in model.state_dict())
        ids = torch.tensor([[0, 5, 7]])
        rows = model.get_input_embeddings()(ids)
        assert rows.dtype == torch.float32 and rows.shape == (1, 3, embedding.shape[1])
        assert float((rows[0] - embedding[ids[0]]).abs().max()) <= float(embedding.abs().max()) / 127
        assert model.to(torch.bfloat16).get_input_embeddings()(ids).dtype == torch.bfloat16
        model.float()
    else:
        assert type(model.get_input_embeddings()) is torch.nn.Embedding
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reloaded.get_input_embeddings()).__name__ == type(model.get_input_embeddings()).__name__
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_fused_model_quantizes_and_reloads(quant_type, tmp_path):
    model = tiny_acip_model("qwen2").prune_model_by_score(0.5).compress().fuse()
    reference = logits(model)
    model.quantize(quant_type)
    assert any(isinstance(m, IntLinear) for m in model.modules())
    quantized = logits(model)
    assert relative_error(quantized, reference) < TOLERANCE[quant_type]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(reloaded), quantized, atol=1e-5, rtol=0)


def test_quantize_errors_name_the_argument_and_change_nothing():
    model = tiny_acip_model("llama").prune_model_by_score(0.5).compress()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="quant_type must be one of"):
        model.quantize("int3")
    with pytest.raises(ValueError, match="compute_dtype"):
        model.quantize("int8", compute_dtype=torch.bfloat16)
    assert model.config.int_quantization is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.quantize("int4")
    quantized = logits(model)
    with pytest.raises(RuntimeError, match="already quantized"):
        model.quantize("int8")
    with pytest.raises(RuntimeError, match="fuse\\(\\) before quantize"):
        model.fuse()
    assert model.config.fused_groups == [] and model.config.int_quantization["quant_type"] == "int4"
    torch.testing.assert_close(logits(model), quantized, atol=0, rtol=0)


def test_a_quantized_prunable_model_still_prunes_and_refuses_compress():
    model = tiny_acip_model("llama").quantize("int8")
    assert isinstance(model.acip_layers()["model.layers.0.self_attn.q_proj"].sv, IntLinear)
    at_full = logits(model)
    model.prune_model_by_score(0.5)
    assert (logits(model) - at_full).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="compress before quantize"):
        model.compress()


@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_compressed_bytes_is_what_quantize_holds(quant_type):
    from acip.memory import model_bytes

    model = tiny_acip_model("mistral").prune_model_by_score(0.45)
    expected = model.compressed_bytes(quant_type)
    assert model_bytes(model.compress().quantize(quant_type)) == expected


def test_auto_budget_plans_a_size_and_a_quant_type():
    from acip.hub.modeling_acip import AUTO_INT8_RATIO
    from acip.memory import model_bytes

    model = tiny_acip_model("llama")
    # a budget int8 fills at (nearly) full size: int8; a quarter of float32: int4 at about twice int8's size
    roomy = model.compressed_bytes("int8")
    assert model.prune_model_by_score(memory_budget=roomy, dtype="auto").planned_quant_type == "int8"
    assert model.get_size_ratio() >= AUTO_INT8_RATIO
    tight = model.compressed_bytes(torch.float32) // 6
    model.prune_model_by_score(memory_budget=tight, dtype="auto")
    assert model.planned_quant_type == "int4"
    assert model.compressed_bytes("int4") <= tight
    assert model_bytes(model.compress().quantize("auto")) <= tight
    assert model.config.int_quantization["quant_type"] == "int4"


def test_auto_errors():
    model = tiny_acip_model("llama")
    with pytest.raises(ValueError, match="quant_type='auto' quantizes as prune_model_by_score"):
        model.quantize("auto")
    with pytest.raises(ValueError, match="dtype only applies to memory_budget"):
        model.prune_model_by_score(0.5, dtype="auto")
    model.prune_model_by_score(0.5)
    assert model.planned_quant_type is None


def test_gptq_rounding_keeps_the_output_error_smaller_than_rounding_to_nearest():
    from acip.hub.quantization import gptq_int4

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    x = torch.randn(2048, 96) @ (0.3 * torch.randn(96, 96) + torch.eye(96))  # correlated inputs, as in an LM
    x[:, :4] *= 10  # a few large input features, as LMs have
    x[:, 7] = 0  # an input that is always 0: no information about its weights
    moment = x.T @ x / len(x)
    errors = {}
    for name, moment_or_none in (("rtn", None), ("gptq", moment)):
        layer = IntLinear.from_linear(linear, "int4", moment_or_none)
        with torch.no_grad():
            errors[name] = relative_error(x @ layer.dequantized().T, linear(x))
    assert errors["gptq"] < 0.7 * errors["rtn"]
    q, scale_zero = gptq_int4(linear.weight, moment)
    assert q.shape == (48, 64) and scale_zero.shape == (2, 48, 2)  # quantize_int4's padded shapes


@pytest.mark.parametrize("fuse", [False, True])
def test_calibrated_int4_is_closer_and_reloads(kind, fuse, tmp_path):
    model = tiny_acip_model(kind).prune_model_by_score(0.6).compress()
    if fuse:
        model.fuse()
    ids = token_ids(4, 24)
    reference = logits(model, ids)
    nearest = copy.deepcopy(model).quantize("int4")
    vocab, generator = model.config.text_config.vocab_size, torch.Generator().manual_seed(1)
    calibration = torch.randint(0, vocab, (8, 24), generator=generator)
    model.quantize("int4", calibration=list(calibration.split(4)))
    calibrated = logits(model, ids)
    assert relative_error(calibrated, reference) < 0.9 * relative_error(logits(nearest, ids), reference)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(reloaded, ids), calibrated, atol=1e-5, rtol=0)


def test_a_fused_group_is_rounded_as_its_members_are():
    plain = tiny_acip_model("qwen2").prune_model_by_score(0.6).compress()
    fused = copy.deepcopy(plain).fuse()
    calibration = list(torch.randint(0, plain.config.text_config.vocab_size, (4, 24),
                                     generator=torch.Generator().manual_seed(2)).split(2))  # fmt: skip
    plain.quantize("int4", calibration=calibration)
    fused.quantize("int4", calibration=calibration)
    assert fused.config.fused_groups
    for group in fused.config.fused_groups:
        sides = [plain.model.get_submodule(m) for m in group]
        sides = [side if isinstance(side, IntLinear) else side.sv for side in sides]
        proj = fused.model.get_submodule(f"{group[0]}.shared.proj")
        torch.testing.assert_close(proj.dequantized(), torch.cat([s.dequantized() for s in sides]), atol=0, rtol=0)


def test_calibration_errors_name_the_argument_and_change_nothing():
    compressed = tiny_acip_model("llama").prune_model_by_score(0.5).compress()
    before = {k: v.clone() for k, v in compressed.state_dict().items()}
    ids = token_ids(2, 8)
    with pytest.raises(ValueError, match=r"calibration applies to quantize\('int4'\) .* quant_type='int8'"):
        compressed.quantize("int8", calibration=ids)
    with pytest.raises(ValueError, match=r"calibration must be \(B, T\) integer token ids in \[0, "):
        compressed.quantize("int4", calibration=ids + compressed.config.text_config.vocab_size)
    with pytest.raises(ValueError, match="calibration must be"):
        compressed.quantize("int4", calibration=ids.float())
    with pytest.raises(ValueError, match="calibration must be"):
        compressed.quantize("int4", calibration=["not token ids"])
    assert compressed.config.int_quantization is None
    assert all(torch.equal(v, compressed.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="on a prunable model"):
        tiny_acip_model("llama").quantize("int4", calibration=ids)
