// Other tilings of the LoRA GEMM (lora_gemm.cuh), selectable with
// `CudaBackend::set_lora_gemm_tiling` and timed beside the engine's own (lora_gemm.cu) by
// benches/cuda.rs, so that one run on a GPU says which suits it. A module of their own:
// the engine's runs never JIT-compile them. Entry suffix: BM x BN x BK, then the stages.
#include "lora_gemm.cuh"

LORA_GEMM_ENTRIES(_128x128x32s4, 128, 128, 32, 4)  // a deeper pipeline
LORA_GEMM_ENTRIES(_128x128x64s4, 128, 128, 64, 4)  // half the barriers per K
LORA_GEMM_ENTRIES(_128x256x32s4, 128, 256, 32, 4)  // 64 x 64 warp tiles: fewer shared loads per mma
LORA_GEMM_ENTRIES(_256x128x32s4, 256, 128, 32, 4)
