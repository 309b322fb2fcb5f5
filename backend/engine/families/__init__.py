"""Model families beyond SD 1.x/2.x/SDXL: FLUX.1 and Stable Diffusion 3 (engine: torch)."""
