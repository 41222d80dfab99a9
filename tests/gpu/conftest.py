import os

# Triton's float32 dot products default to tf32 (10-bit mantissa). The float32 checks below compare
# kernel logic, not tf32 rounding, so they ask Triton for IEEE float32 before any kernel compiles.
# (With tf32, gradients of random ill-conditioned weights differ by a few percent; training is bf16.)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
