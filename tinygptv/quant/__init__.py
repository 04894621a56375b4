# Reduced precision for inference (--quant none|bf16|int8|int4|int8-dynamic on every inference command, `tinygptv quantize`):
# a loaded TinyGPTV -> [tinygptv.quant] -> the same model API with smaller weights and faster kernels.
from tinygptv.quant.apply import (
    QUANT_MODES, build_random_quantized, check_mode, prepare_for_quantized_weights, quantize_model,
    weight_bytes_per_token,
)
from tinygptv.quant.cpu_linear import Int4Linear, Int8DynamicLinear, Int8Linear

__all__ = ["QUANT_MODES", "Int4Linear", "Int8DynamicLinear", "Int8Linear", "build_random_quantized", "check_mode",
           "prepare_for_quantized_weights", "quantize_model", "weight_bytes_per_token"]
