"""Samplers: DDPM ancestral, DDIM (η ≥ 0), Euler, Euler ancestral, Euler–Maruyama (reverse VP-SDE),
Heun (EDM, with S_churn) and DPM-Solver++(2M); ``sample`` and ``denoise``."""
from symfast.samplers.api import denoise, sample, sampling_sigmas
from symfast.samplers.loops import (SAMPLERS, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                                    sample_euler, sample_euler_ancestral, sample_euler_maruyama,
                                    sample_heun)

__all__ = ["sample", "denoise", "sampling_sigmas", "SAMPLERS", "sample_ddim",
           "sample_ddpm", "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral",
           "sample_euler_maruyama", "sample_heun"]
