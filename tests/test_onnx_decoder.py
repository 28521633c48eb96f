"""The fused ONNX decoder (export/decoder_graph.py) against torch, op for op: the MatMulNBits packing,
both block types (llama, TinyGPT-V's Phi-2 variant), both RoPE paths (inside GroupQueryAttention and
plain ops), the shared KV buffer growing past its first size, fp16 activations, and the quantized floors."""
import numpy as np
import pytest
import torch

from edge_vlm.export import decoder_graph, nbits
from edge_vlm.export.llm_onnx import FP32_LOGITS_ATOL
from edge_vlm.runtime.llm_onnx import OnnxDecoderSession
from tiny_models import LLMS


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models import smollm2_tokenizer

    return smollm2_tokenizer()


def matmul_nbits(qm: nbits.QuantizedMatrix, accuracy_level: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, n) for a, n in ((qm.packed, "B"), (qm.scales, "S"), (qm.zeros, "Z"))]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=qm.k, N=qm.n,
                            bits=qm.bits, block_size=qm.block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", qm.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, ir_version=decoder_graph.IR_VERSION,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,method", [(4, "rtn"), (4, "hqq"), (8, "rtn")])
def test_packing_is_what_onnxruntime_dequantizes(bits, method):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((40, 100)).astype(np.float32)  # K not a multiple of the block: padded
    qm = nbits.quantize(w, bits, 32, method)
    x = rng.standard_normal((1, 3, 100)).astype(np.float32)
    y = matmul_nbits(qm, 0).run(None, {"x": x})[0]
    integer_part = qm.dequantize() + (0 if qm.correction is None else np.repeat(qm.correction.T, 32, 1)[:, :100])
    np.testing.assert_allclose(y, x @ integer_part.T, rtol=1e-5, atol=1e-5)
    err = np.linalg.norm(qm.dequantize() - w) / np.linalg.norm(w)
    assert err < {4: 0.1, 8: 0.01}[bits]


def test_folded_hqq_correction_is_one_kernel_on_the_fast_path():
    """HQQ's zero-point remainder, folded into extra K columns that read [x, blocksum(x), 0...], gives what the
    float-zero-point matrix gives, through onnxruntime's fast int8-activation kernel (accuracy_level 4)."""
    rng = np.random.default_rng(3)
    k, n = 96, 40
    w = (rng.integers(0, 16, (n, k)) * 0.01 - 0.077).astype(np.float32)  # a float-offset grid: corrections matter
    qm = nbits.quantize(w, 4, 32, "hqq")
    folded = nbits.fold_correction(qm)
    assert folded.correction is None and folded.k == k + nbits.correction_columns(qm) == k + 32
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    sums = np.zeros((1, 5, 32), np.float32)
    sums[..., :3] = x.reshape(1, 5, 3, 32).sum(-1)
    want = x @ qm.dequantize().T
    got0 = matmul_nbits(folded, 0).run(None, {"x": np.concatenate([x, sums], -1)})[0]
    got4 = matmul_nbits(folded, 4).run(None, {"x": np.concatenate([x, sums], -1)})[0]
    scale = np.abs(want).max()
    assert np.abs(got0 - want).max() < 5e-3 * scale  # only the corrections' own 4-bit rounding
    assert np.abs(got4 - want).max() < 2e-2 * scale  # plus int8 activations
    rounded_only = x @ (qm.dequantize() + np.repeat(qm.correction.T, 32, 1)).T  # what dropping them would cost
    assert np.abs(rounded_only - want).max() > 10 * np.abs(got0 - want).max()


def test_hqq_beats_rtn_on_weights_already_on_a_float_offset_grid():
    """The built-in model's weights were Q4_1 (w = d * q + m per block of 32): rtn's integer zero point shifts
    each block by up to half a step, HQQ's split zero point does not."""
    rng = np.random.default_rng(0)
    d = rng.uniform(0.01, 0.02, (64, 8, 1))
    m = rng.uniform(-0.15, -0.05, (64, 8, 1))
    w = (rng.integers(0, 16, (64, 8, 32)) * d + m).reshape(64, 256).astype(np.float32)
    err = {k: np.abs(nbits.quantize(w, 4, 32, k).dequantize() - w).mean() for k in nbits.METHODS}
    assert err["hqq"] < 0.5 * err["rtn"], err


def run_both(llm, session, steps: int, seed: int = 0):
    """Prefill 7 random embeddings, then `steps` greedy tokens in both; per-step max |logit diff| and agreement."""
    from transformers import DynamicCache

    emb = torch.randn(1, 7, llm.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    diffs, agree = [], []
    with torch.no_grad():
        ref = llm(inputs_embeds=emb, past_key_values=cache, use_cache=True).logits[0, -1].numpy()
    session.eval_embeds(emb[0].numpy())
    for step in range(steps):
        got = session.logits()
        assert got.shape == ref.shape
        diffs.append(float(np.abs(ref - got).max()))
        agree.append(int(ref.argmax()) == int(got.argmax()))
        t = int(ref.argmax())
        with torch.no_grad():
            ref = llm(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[7 + step]])).logits[0, -1].numpy()
        session.eval_tokens([t])
    return max(diffs), float(np.mean(agree))


# hidden 64: head_dim 16, Phi's rotary_dim 6 -> RoPE in plain ops; hidden 320: head_dim 80, rotary 32 -> inside
CASES = [("llama", 64, True), ("tinygpt_v_phi", 64, False), ("tinygpt_v_phi", 320, True)]


@pytest.mark.parametrize("arch,hidden,inside", CASES)
def test_fp32_graph_equals_torch_past_the_first_cache_size(tokenizer, tmp_path, arch, hidden, inside):
    torch.manual_seed(0)
    llm = LLMS[arch](tokenizer, hidden)
    info = decoder_graph.build(llm, arch, tmp_path / "llm.onnx", decoder_graph.GraphQuant(bits=32))
    assert info["rotary_inside"] is inside
    s = OnnxDecoderSession(tmp_path / "llm.onnx", llm.get_input_embeddings().weight.detach().numpy(), None,
                           n_ctx=512, threads=1)
    diff, agree = run_both(llm, s, 300)  # the CPU cache starts at 256 positions and grows
    assert s.capacity >= 300 and agree == 1.0 and diff < FP32_LOGITS_ATOL, (diff, agree)


@pytest.mark.parametrize("arch,hidden,inside", CASES[:2])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_graph_holds_its_floor(tokenizer, tmp_path, arch, hidden, inside, bits):
    """Random tiny weights at initializer_range 0.2 leave near-ties everywhere; the floors catch broken graphs
    (agreement near chance), as the export's own do."""
    torch.manual_seed(0)
    llm = LLMS[arch](tokenizer, hidden)
    decoder_graph.build(llm, arch, tmp_path / "llm.onnx", decoder_graph.GraphQuant(bits=bits, method="hqq"))
    s = OnnxDecoderSession(tmp_path / "llm.onnx", llm.get_input_embeddings().weight.detach().numpy(), None,
                           n_ctx=64, threads=1)
    _, agree = run_both(llm, s, 24)
    assert agree >= {8: 0.75, 4: 0.2}[bits], agree


@pytest.mark.parametrize("arch,hidden", [("llama", 64), ("tinygpt_v_phi", 320)])
def test_fp16_graph_for_cuda_runs_and_stays_close(tokenizer, tmp_path, arch, hidden):
    """The --device cuda graph (fp16 activations and cache) runs on the CPU provider too: the export validates it
    there. Its logits stay within fp16 rounding of torch's."""
    torch.manual_seed(0)
    llm = LLMS[arch](tokenizer, hidden)
    decoder_graph.build(llm, arch, tmp_path / "llm.onnx", decoder_graph.GraphQuant(bits=16, dtype="float16"))
    table = llm.get_input_embeddings().weight.detach().numpy().astype(np.float16)
    s = OnnxDecoderSession(tmp_path / "llm.onnx", table, None, n_ctx=64, threads=1)
    assert s.dtype == np.float16 and s.past[0].numpy().dtype == np.float16
    diff, agree = run_both(llm, s, 8)
    assert diff < 0.1 and agree >= 0.75, (diff, agree)
