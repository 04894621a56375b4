# What one LLM decoder layer keeps for the backward pass, per token and per hidden unit, at full width: the number the
# memory planner (tinygptv/train/plan.py) multiplies by sequence x batch x hidden x layers. Measured on the CPU by
# adding up the tensors autograd saves (torch.autograd.graph.saved_tensors_hooks), so it needs no GPU.
#   python benchmarks/saved_activations.py [--preset tinygptv-stage4] [--llm lora+norms] [--tokens 256]
from __future__ import annotations

import argparse

import torch


def saved_bytes(preset_name: str, llm_policy: str, batch: int, tokens: int, layers: int) -> dict:
    """Build the preset's LLM with `layers` layers at full width, bf16 weights (the frozen ones are half precision
    on a GPU; the trained ones compute in it), the recipe's trainable set, train mode (dropout masks count); run a
    forward on random embeddings and add up every saved tensor that is not a weight, once per storage."""
    from tinygptv.config import preset
    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.train.recipe import Tune
    from tinygptv.train.tune import apply_tune

    config = preset(preset_name)
    config.llm.num_layers = layers
    config.vision.depth = 1  # the tower runs without a graph in training; keep it small here
    torch.manual_seed(0)
    model = TinyGPTV(config)
    apply_tune(model, Tune(llm=llm_policy))
    model.to(torch.bfloat16).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    hidden = config.llm.hidden_size
    embeds = torch.randn(batch, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)  # [B, S, D]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.llm.model(inputs_embeds=embeds)
    total = sum(kept.values())
    return {"bytes_per_layer": total / layers, "per_token_per_hidden": total / layers / (batch * tokens * hidden)}


def main() -> None:
    parser = argparse.ArgumentParser(description="bytes an LLM decoder layer keeps for the backward pass")
    parser.add_argument("--preset", default="tinygptv-stage4")
    parser.add_argument("--llm", default="lora+norms", help="tune.llm policy: which LLM weights train")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.preset}, tune.llm={args.llm}, {args.layers} layers, bf16, CPU ({torch.__version__})")
    for tokens in args.tokens:
        got = saved_bytes(args.preset, args.llm, 1, tokens, args.layers)
        print(f"  {tokens:5d} tokens: {got['bytes_per_layer'] / 2**20:8.1f} MiB per layer, "
              f"{got['per_token_per_hidden']:.2f} bytes per token per hidden unit")


if __name__ == "__main__":
    main()
