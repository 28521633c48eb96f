"""Block-wise weight quantization into onnxruntime's MatMulNBits layout, in numpy, one matrix at a time.

The fused decoder builder (decoder_graph.py) quantizes each weight as it emits it, so an export never
holds an fp32 graph or a second copy of the model. Layout (onnxruntime's contrib op MatMulNBits):

  weight   W [N, K] (a torch Linear's [out, in]) cut into blocks of `block` along K (K padded with zeros)
  B        uint8 [N, n_blocks, block * bits / 8]; 4 bits: element 2j in the low nibble, 2j+1 in the high one
  scales   float [N * n_blocks]
  zeros    uint8; 4 bits: two per byte (low nibble first), [N, ceil(n_blocks / 2)]; 8 bits: [N, n_blocks]
  dequantized  W[n, k] = (q[n, k] - zero[n, block(k)]) * scale[n, block(k)]

onnxruntime packs such weights once and runs integer kernels on them (accuracy_level 4); float
zero points would make it dequantize the whole matrix on every call (70x slower). So every method
here ends with integer zero points. Methods:

  rtn   round to nearest over each block's [min, max] (integer zero point)
  hqq   half-quadratic quantization (Badri & Shaji 2023): the zero point is fitted to the weights with a
        sparsity-promoting (l_p, p < 1) error, which suits weights with outliers and weights that were
        already quantized on another grid (the built-in model's Q4_1). Its float zero point z is split
        exactly into zi = round(z) and a remainder d = z - zi; the remainder's effect is
        -blocksum(x) @ (d * s)^T (`correction`). `fold_correction` makes that term extra K columns of the same
        MatMulNBits, which then takes [x, blocksum(x)]: one kernel per projection, no extra matmul and
        subtraction (each small op costs a few microseconds per token, and a 30-layer decoder has 120).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("rtn", "hqq")
HQQ_ROWS = 256  # output rows per HQQ pass (whole-matrix passes make temporaries the size of the matrix)
RTN_ROWS = 4096  # output rows per round-to-nearest pass


@dataclass
class QuantizedMatrix:
    n: int
    k: int
    bits: int
    block: int
    packed: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N * n_blocks]
    zeros: np.ndarray  # uint8, packed as above
    correction: np.ndarray | None = None  # float32 [n_blocks, N]: hqq's zero-point remainder times scale

    def dequantize(self) -> np.ndarray:
        """The [N, K] float weights this encodes (including the correction): for tests and error reports."""
        nb = self.packed.shape[1]
        q = unpack(self.packed, self.bits).reshape(self.n, nb, self.block).astype(np.float32)
        z = unpack_zeros(self.zeros, self.bits, nb).reshape(self.n, nb, 1).astype(np.float32)
        s = self.scales.reshape(self.n, nb, 1)
        w = (q - z) * s
        if self.correction is not None:
            w = w - self.correction.T.reshape(self.n, nb, 1)
        return w.reshape(self.n, nb * self.block)[:, : self.k]


def blocks(w: np.ndarray, block: int) -> np.ndarray:
    """[N, K] -> float32 [N, n_blocks, block], K zero-padded to a multiple of `block`."""
    n, k = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.concatenate([w, np.zeros((n, nb * block - k), w.dtype)], axis=1)
    return np.ascontiguousarray(w, dtype=np.float32).reshape(n, nb, block)


def quantize(w: np.ndarray, bits: int, block: int, method: str = "rtn") -> QuantizedMatrix:
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits takes 4 or 8 bits, not {bits}")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}: use one of {', '.join(METHODS)}")
    n, k = w.shape
    nb = -(-k // block)
    hqq = method == "hqq" and bits == 4
    top = (1 << bits) - 1
    packed = np.empty((n, nb, block * bits // 8), np.uint8)
    scales, zeros = np.empty((n, nb), np.float32), np.empty((n, nb), np.uint8)
    correction = np.empty((n, nb), np.float32) if hqq else None
    rows = HQQ_ROWS if hqq else RTN_ROWS
    for i in range(0, n, rows):  # in row chunks: temporaries stay small (a 51200-row output head is 0.5 GB in fp32)
        wb = blocks(w[i:i + rows], block)
        q, z, s = _hqq(wb, bits) if hqq else _rtn(wb, bits)
        zi = np.clip(np.rint(z), 0, top)
        packed[i:i + rows] = pack(q.astype(np.uint8), bits)
        scales[i:i + rows], zeros[i:i + rows] = s[..., 0], zi[..., 0]
        if hqq:
            correction[i:i + rows] = (z - zi)[..., 0] * s[..., 0]
    return QuantizedMatrix(n, k, bits, block, packed, scales.reshape(-1), pack_zeros(zeros, bits),
                           None if correction is None else np.ascontiguousarray(correction.T))


def fold_correction(qm: QuantizedMatrix) -> QuantizedMatrix:
    """The same projection over K' = K + extra columns that hold -correction, quantized to the matrix's own
    bits (rtn; a correction is usually at most half a step, more where HQQ's zero point fell outside the
    integer range and was clipped; the LLM's agreement check covers the result):
    x @ W^T = [x, blocksum(x), 0...] @ W'^T. The block sums are padded with zeros to whole blocks;
    `correction_columns(qm)` says how many columns the graph must append."""
    assert qm.correction is not None and qm.k % qm.block == 0, "only a block-aligned hqq matrix has a correction"
    nb = qm.packed.shape[1]
    extra = np.zeros((qm.n, correction_columns(qm)), np.float32)
    extra[:, :nb] = -qm.correction.T
    cq = quantize(extra, qm.bits, qm.block, "rtn")
    zeros = np.concatenate([unpack_zeros(qm.zeros, qm.bits, nb), unpack_zeros(cq.zeros, cq.bits, cq.packed.shape[1])], 1)
    return QuantizedMatrix(qm.n, qm.k + extra.shape[1], qm.bits, qm.block,
                           np.ascontiguousarray(np.concatenate([qm.packed, cq.packed], 1)),
                           np.concatenate([qm.scales.reshape(qm.n, nb), cq.scales.reshape(qm.n, -1)], 1).reshape(-1),
                           pack_zeros(zeros, qm.bits))


def correction_columns(qm: QuantizedMatrix) -> int:
    """Columns appended to x for a folded correction: one block sum per block, padded to whole blocks."""
    nb = -(-qm.k // qm.block)
    return -(-nb // qm.block) * qm.block


def _rtn(wb, bits):
    top = (1 << bits) - 1
    lo = np.minimum(wb.min(-1, keepdims=True), 0.0)  # the range holds 0, so 0 is exact (padding, pruned weights)
    hi = np.maximum(wb.max(-1, keepdims=True), 0.0)
    s = (hi - lo) / top
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    z = np.clip(np.rint(-lo / s), 0, top)
    q = np.clip(np.rint(wb / s + z), 0, top)
    return q, z, s


def _hqq(wb, bits, iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01):
    """HQQ's zero-point solver: alternate rounding and an l_p-shrunk fit of the zero point, keep each block's
    best. In torch (threaded; the export has it loaded anyway) rather than numpy's single-threaded loops."""
    import torch

    top = (1 << bits) - 1
    w = torch.from_numpy(wb)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    s = (hi - lo) / top
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = -lo / s
    best_err, best_z = torch.full_like(z, float("inf")), z.clone()
    for _ in range(iters):
        q = torch.clamp(torch.round(w / s + z), 0, top)
        r = w - (q - z) * s
        err = r.abs().mean(-1, keepdim=True)
        better = err < best_err
        if not bool(better.any()):
            break
        best_err, best_z = torch.where(better, err, best_err), torch.where(better, z, best_z)
        e = torch.sign(r) * torch.relu(r.abs() - (1.0 / beta) * (r.abs() + 1e-8) ** (p - 1))  # l_p shrinkage
        z = (q - (w - e) / s).mean(-1, keepdim=True)
        beta *= kappa
    q = torch.clamp(torch.round(w / s + best_z), 0, top)
    return q.numpy(), best_z.numpy(), s.numpy()


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, nb, block] -> [N, nb, block * bits / 8]."""
    if bits == 8:
        return np.ascontiguousarray(q)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 15, packed >> 4
    return out


def pack_zeros(z: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, nb] zero points -> MatMulNBits' zero_points."""
    if bits == 8:
        return np.ascontiguousarray(z.reshape(-1))
    n, nb = z.shape
    out = np.zeros((n, (nb + 1) // 2), np.uint8)
    out[:, : (nb + 1) // 2] = z[:, 0::2]
    out[:, : nb // 2] |= z[:, 1::2] << 4
    return out.reshape(-1)


def unpack_zeros(packed: np.ndarray, bits: int, nb: int) -> np.ndarray:
    if bits == 8:
        return packed.reshape(-1, nb)
    p = packed.reshape(-1, (nb + 1) // 2)
    return unpack(p, 4)[:, :nb]
