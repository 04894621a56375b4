# A converted OpenVINO LLM behind transformers' generate(): token ids or spliced embeddings -> [the embedding table,
# the only LLM weight PyTorch keeps -> one engine step with the K/V held as the engine's own state] -> logits.
# TinyGPTV.generate, stream_generate, eval's batched paths and the quantize report drive it like the PyTorch LLM.
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tinygptv.engine.openvino_compile import compile_file
from tinygptv.engine.openvino_export import LLM_BIN, LLM_XML, import_openvino
from tinygptv.engine.step import kv_shape

class EngineState:
    """The K/V cache of one generation, kept inside the engine: an infer request of its own (so two generations never
    share state), the number of positions it holds, and reordering for beam search and eval's shared prefixes.
    generate() carries it from step to step as its cache object."""

    is_compileable = False  # generate() asks before deciding whether to torch.compile the step

    def __init__(self, compiled, batch: int, heads: int, head_dim: int):
        ov = import_openvino()
        self.request = compiled.create_infer_request()
        self.length = 0
        self.batch = batch
        empty = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)  # [B, H_kv, 0, Dh]
        # A state the engine never wrote has no batch size (its dynamic sizes read as 0), so each starts as an empty
        # past of this batch.
        for variable in self.request.query_state():
            variable.state = ov.Tensor(empty)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def step(self, embeds: Tensor, mask: Tensor, positions: Tensor, logits_index: Tensor) -> Tensor:
        out = self.request.infer({
            "inputs_embeds": embeds.detach().float().contiguous().numpy(),
            "attention_mask": mask.detach().long().contiguous().numpy(),
            "position_ids": positions.detach().long().contiguous().numpy(),
            "logits_index": logits_index.detach().long().contiguous().numpy(),
        }, share_outputs=False)
        self.length += embeds.shape[1]
        return torch.from_numpy(out["logits"])  # [B, K, V]

    def reorder_cache(self, index: Tensor) -> None:
        """Row b of the cache becomes row index[b] (beam search's survivors; eval copies one image's prefix to every
        question of it, so `index` may be longer than the batch)."""
        order = index.detach().cpu().numpy()
        if order.shape[0] == self.batch and (order == np.arange(order.shape[0])).all():
            return
        ov = import_openvino()
        for variable in self.request.query_state():
            variable.state = ov.Tensor(np.ascontiguousarray(variable.state.data[order]))
        self.batch = order.shape[0]


class EmbeddingTable(nn.Module):
    """The part of the LLM that stays in PyTorch: the input embeddings, which TinyGPTV splices image embeddings
    between. Named `embed_tokens` under `model`, as in transformers' Phi and Llama, so a model folder's
    `llm.model.embed_tokens.weight` loads into it unchanged."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)

    def forward(self, *args, **kwargs):
        raise RuntimeError("this LLM runs in an inference engine: call the causal LM (model.llm), not its decoder "
                           "(the training forward needs --backend torch)")


class OpenVINOCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose decoder layers, final norm and lm_head run in OpenVINO. transformers' generate() drives it
    unchanged (greedy, sampling, beam search, stop strings, streamers), because its forward takes what the PyTorch
    LM's does (input ids or embeddings, attention mask, positions, a cache) and returns logits and the cache."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True  # attention runs in the engine; declared so the LM's config is accepted as it is

    def __init__(self, config, compiled, mode: str):
        super().__init__(config)
        self.model = EmbeddingTable(config.vocab_size, config.hidden_size)
        self.compiled = compiled
        self.mode = mode
        self.kv_heads, self.head_dim = kv_shape(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the K/V lives in the engine: generate() must not build a DynamicCache of its own

    def _init_weights(self, module):
        pass  # the only weight, the embedding table, is always loaded

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return None  # lm_head is inside the engine

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: EngineState | None = None, use_cache: bool = True, logits_to_keep: int | Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """As the PyTorch LM: the new tokens' ids or embeddings [B, S(, D)], the mask over past and new tokens
        [B, P + S], positions [B, S] (default: counting on from the cache), logits for the last `logits_to_keep`
        positions (0: all) or for the given indices. A call without a cache starts a new one."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        batch, new = inputs_embeds.shape[:2]
        state = cache if cache is not None else EngineState(self.compiled, batch, self.kv_heads, self.head_dim)
        past = state.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + new, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past, past + new).expand(batch, -1)
        if isinstance(logits_to_keep, int):
            logits_index = torch.arange(new - logits_to_keep if 0 < logits_to_keep <= new else 0, new)
        else:
            logits_index = logits_to_keep
        logits = state.step(inputs_embeds, attention_mask, position_ids, logits_index)
        return CausalLMOutputWithPast(logits=logits, cache=state if use_cache else None)


def load_openvino_llm(folder: Path, llm_config, mode: str, embed_dtype: torch.dtype,
                      threads: int | None = None) -> OpenVINOCausalLM:
    """The engine LLM of a converted folder, its embedding table on the meta device (the model's loader fills it).
    llm_config: the transformers config of the PyTorch LLM it replaces (phi_config / llama_config)."""
    compiled = compile_file(folder, LLM_XML, mode, threads)
    with torch.device("meta"):
        llm = OpenVINOCausalLM(llm_config, compiled, mode)
    llm.model.embed_tokens.to(dtype=embed_dtype)
    llm.engine_weight_bytes = (Path(folder) / LLM_BIN).stat().st_size  # all of it is read for every token
    warm_up(llm)
    return llm.eval()


def warm_up(llm: OpenVINOCausalLM) -> None:
    """One token through a cache of its own, then dropped. OpenVINO's CPU plugin rearranges compressed weights into
    its kernels' layout at a model's first inference, not when compiling nor in its compiled-model cache: 8 s of a
    first answer for int4 Phi-2 on 2 cores (docs/quantization.md). Done here, it is part of loading, and a chat's,
    a server's or a demo's first answer costs what every later one does."""
    one = torch.zeros(1, 1, dtype=torch.long)
    EngineState(llm.compiled, 1, llm.kv_heads, llm.head_dim).step(
        torch.zeros(1, 1, llm.config.hidden_size), torch.ones_like(one), one, one.view(1))
