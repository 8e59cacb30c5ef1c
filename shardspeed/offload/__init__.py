"""CPU and NVMe offload: swap buffers, async file I/O, the CPU optimizer step."""
