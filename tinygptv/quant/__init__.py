# Reduced precision for inference (--quant on every inference command, `tinygptv quantize`): a loaded TinyGPTV ->
# [apply.py: per-component dtypes, LLM linears swapped for cpu_linear / bnb_linear layers] -> the same model API.
"""Import what you need from its module (apply, cpu_linear, bnb_linear, modes, quality): this package file stays
empty so that `tinygptv.quant.modes` (names only) loads without torch."""
