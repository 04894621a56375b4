# Reduced precision for inference (--quant on every inference command, `tinygptv quantize`):
# a loaded TinyGPTV -> [tinygptv.quant] -> the same model API with smaller weights and faster kernels.
from tinygptv.quant.apply import (
    CPU_MODES, QUANT_MODES, build_random_quantized, check_mode, modes_for, prepare_for_quantized_weights,
    quantize_model, weight_bytes_per_token,
)
from tinygptv.quant.bnb_linear import BNB_MODES
from tinygptv.quant.cpu_linear import Int4Linear, Int8DynamicLinear, Int8Linear

__all__ = ["BNB_MODES", "CPU_MODES", "QUANT_MODES", "Int4Linear", "Int8DynamicLinear", "Int8Linear",
           "build_random_quantized", "check_mode", "modes_for", "prepare_for_quantized_weights", "quantize_model",
           "weight_bytes_per_token"]
