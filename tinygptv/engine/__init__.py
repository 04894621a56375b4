# Optimised inference engines behind --backend (OpenVINO): TinyGPT-V's LLM exported once from our own modules,
# weight-compressed, cached, and run behind the same generate() API. At the quant layer; checkpoint.loading calls it.
"""Import what you need from its module (backends, step, store, openvino_export, openvino_llm): this package file
stays empty so that `tinygptv.engine.backends` (names only) loads without torch or the engine."""
