"""Model families beyond SD 1.x/2.x/SDXL (FLUX.1, Stable Diffusion 3): detection, loading, quantized weights."""
