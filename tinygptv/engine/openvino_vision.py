# The vision tower in OpenVINO, the first stage of the data path: pixels [B, 3, S, S] -> [the tower, converted once
# into vision.xml / vision.bin beside the LLM's, int8 weights] -> image tokens [B, N, Dv] -> ln_vision (PyTorch) -> ...
# attach.py converts and loads it with the LLM; TinyGPTV.encode_image calls it as it calls the PyTorch tower.
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from tinygptv.engine.openvino_compile import compile_file
from tinygptv.engine.openvino_export import compress_weights, import_openvino, quiet_tracing
from tinygptv.model.vision.pixels import check_image_size

VISION_XML = "vision.xml"  # and vision.bin beside it
# The tower's weights per --quant mode. int4 keeps int8 here: the tower reads each weight once per image, so it is
# bound by arithmetic, not memory, and OpenVINO's int8 matmuls (activations quantized inside them, VNNI) encoded
# EVA ViT-g 1.1-1.3x faster than PyTorch's bf16 on our CPU (docs/quantization.md), nano's easy-VQA score unchanged.
# 4-bit codes would save memory only, at a cost in the features every answer starts from.
VISION_MODE = {"none": "none", "int8": "int8", "int4": "int8"}


def export_vision(tower: nn.Module, mode: str, folder: Path) -> None:
    """Write vision.xml / vision.bin for `tower` (consumed: made fp32 in place) into `folder` (a staging folder):
    input pixel_values [B, 3, S, S] f32 (any batch), output image_tokens [B, N, Dv] f32. Unlike the LLM, the tower
    is traced from fp32 weights: EfficientNet traced through bf16 weights read as fp32 (the LLM's way of halving a
    conversion's memory) came out of OpenVINO wrong (its features off by up to 6.0, PyTorch's bf16 by 1.7), and the
    tower is a third of the LLM's size, converted after the LLM is freed."""
    ov = import_openvino()
    size = tower.image_size
    tower = tower.float()
    with torch.no_grad(), quiet_tracing():
        model = ov.convert_model(tower.eval(), example_input=torch.zeros(1, 3, size, size),
                                 input=[ov.PartialShape([-1, 3, size, size])])
    model.inputs[0].get_tensor().set_names({"pixel_values"})
    model.outputs[0].get_tensor().set_names({"image_tokens"})
    model = compress_weights(model, VISION_MODE[mode])
    ov.save_model(model, Path(folder) / VISION_XML, compress_to_fp16=False)


class OpenVINOVisionTower(nn.Module):
    """Stands where the PyTorch tower stood (model.visual_encoder): the same sizes for the Q-Former side
    (num_tokens, num_features), the same image-size check, fp32 tokens out (ln_vision casts them to its dtype).
    It holds no PyTorch weights, so casting the model leaves it as it is."""

    def __init__(self, compiled, mode: str, image_size: int, num_tokens: int, num_features: int):
        super().__init__()
        self.compiled = compiled
        self.mode = mode
        self.image_size = image_size
        self.num_tokens = num_tokens
        self.num_features = num_features
        self.engine_precision = f"openvino-{VISION_MODE[mode]}"  # what the bench reports as the tower's dtype

    def forward(self, pixel_values: Tensor) -> Tensor:
        check_image_size(pixel_values, self.image_size)
        request = self.compiled.create_infer_request()  # one per call: the server may encode in several threads
        out = request.infer({"pixel_values": pixel_values.detach().float().contiguous().numpy()}, share_outputs=False)
        return torch.from_numpy(out["image_tokens"])  # [B, N, Dv]


def load_openvino_vision(folder: Path, mode: str, image_size: int, num_tokens: int, num_features: int,
                         threads: int | None = None) -> OpenVINOVisionTower:
    compiled = compile_file(folder, VISION_XML, VISION_MODE[mode], threads)
    return OpenVINOVisionTower(compiled, mode, image_size, num_tokens, num_features).eval()
