"""CUDA C++ shared by the NVRTC-compiled kernels (cuda_ternary.py, cuda_gemv.py): 16-bit float conversions."""

CONVERSIONS = r"""
__device__ __forceinline__ float to_float_bf16(unsigned short v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ float to_float_f16(unsigned short v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ unsigned short from_float_bf16(float f) { unsigned short v; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
__device__ __forceinline__ unsigned short from_float_f16(float f) { unsigned short v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v; }
"""
