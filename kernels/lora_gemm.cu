// The LoRA GEMM as the engine runs it: 128 x 128 output tiles, K 32 at a time, 3 cp.async
// stages (the kernel, its uses, tiling and precision: lora_gemm.cuh). The other tilings,
// timed beside this one by benches/cuda.rs, are in lora_gemm_tiles.cu.
#include "lora_gemm.cuh"

LORA_GEMM_ENTRIES(, 128, 128, 32, 3)
