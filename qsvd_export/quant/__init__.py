"""Quantization numerics, one job per module.

- :mod:`.presets`: ``Bits`` presets (``w8a8``, ``w4a16``, …) — no torch;
- :mod:`.fake`: torch fake quantization (the torch stage's β search);
- :mod:`.matmul_nbits`: block-wise int4/int8 weights packed for ``com.microsoft.MatMulNBits`` (cpu, gpu);
- :mod:`.lpbq`: int4 weights in QNN's low-power block quantization (npu);
- :mod:`.weight_ranges`: per-channel MSE weight clips (npu);
- :mod:`.activation_ranges`: calibrated activation ranges (minmax, percentile, MSE) (npu).
"""
