# Which weights train and at what learning rate, from the recipe's per-component tune policy (frozen / norms / lora /
# full). The model is untouched apart from requires_grad; the optimizer groups follow the official decay rule.
from __future__ import annotations

import torch

from tinygptv.model.llm import LLM_ADAPTERS
from tinygptv.model.lora import is_lora_param
from tinygptv.model.tinygptv import component_of
from tinygptv.train.recipe import Tune


def trainable_component(name: str, model, tune: Tune) -> str | None:
    """The tune component a parameter belongs to if the policy trains it, else None."""
    adapter = LLM_ADAPTERS[model.config.llm.name]
    comp = component_of(name, adapter.added_norms)
    if comp == "vision":
        return "vision" if tune.vision == "full" else None
    if comp in ("qformer", "ln_vision"):
        if tune.qformer == "full":
            return "qformer"
        new_part = comp == "ln_vision" or name == "connector.query_tokens" or ".crossattention." in name
        return "qformer" if tune.qformer == "cross_attention" and new_part else None
    if comp == "projector":
        return "projector" if tune.projector == "full" else None
    policy = tune.llm
    if policy == "full":
        return "llm"
    if is_lora_param(name):
        return "llm" if policy in ("lora", "lora+norms") else None
    if name.endswith(adapter.trainable_norms):
        return "llm" if policy in ("norms", "lora+norms") else None
    return None


def apply_tune(model, tune: Tune) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Set requires_grad from the policy; return the trainable parameters by component."""
    if tune.llm in ("lora", "lora+norms") and model.config.lora.r <= 0:
        raise ValueError(f"tune.llm is {tune.llm!r} but the model has no LoRA (lora.r = 0): set model.config.lora.r")
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        comp = trainable_component(name, model, tune)
        param.requires_grad_(comp is not None)
        if comp is not None:
            groups.setdefault(comp, []).append((name, param))
    if not groups:
        raise ValueError("the tune policy leaves nothing to train")
    return groups


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """LAVIS's rule: weight decay on matrices whose name has no 'bias', 'ln' or 'bn'; every norm weight is 1-D."""
    return param.ndim >= 2 and not any(k in name for k in ("bias", "ln", "bn"))


def build_optimizer(groups, weight_decay: float, lr_scale: dict[str, float]) -> torch.optim.AdamW:
    param_groups = []
    for comp, params in sorted(groups.items()):
        scale = lr_scale.get(comp, 1.0)
        for decay in (True, False):
            chosen = [p for n, p in params if decays(n, p) == decay]
            if chosen:
                param_groups.append({"params": chosen, "weight_decay": weight_decay if decay else 0.0,
                                     "lr_scale": scale, "name": f"{comp}/{'decay' if decay else 'no_decay'}"})
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999))
