"""Measured ceilings on this GPU: bf16 matmul TFLOP/s and copy bandwidth."""
import torch
import triton

a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
print(f"bf16 matmul 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
y = torch.empty_like(x)
ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
print(f"device copy 1 GiB: {2 * (1 << 30) / ms / 1e6:.0f} GB/s (read + write)")
