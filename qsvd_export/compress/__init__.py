"""Torch stage of QSVD: calibration, whitened joint SVD, rank allocation, β, rotations → CompressionPlan."""
