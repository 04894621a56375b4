# Converter from the official release (TinyGPT-V_for_StageN.pth + Phi-2 folder + LAVIS eva_vit_g.pth +
# blip2_pretrained_flant5xxl.pth) to our folder format. Data path: official files -> [official.py, phi2.py] ->
# our folder (config.json + model.safetensors + tokenizer) -> tinygptv.checkpoint.load_pretrained.
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinygptv.atomic import check_output_dir, writing_dir
from tinygptv.checkpoint.native import CheckpointError, is_model_entry, load_into, read_pth, write_model_files
from tinygptv.checkpoint.phi2 import (
    FileReport,
    Phi2Checkpoint,
    TensorLedger,
    copy_tokenizer_files,
    layer_indices,
    read_phi2,
    require_contiguous,
    tokenizer_files,
    vote,
)
from tinygptv.config import (
    CONFIG_NAME,
    LLMConfig,
    LoRAConfig,
    ProjectorConfig,
    QFormerConfig,
    TinyGPTVConfig,
    VisionConfig,
    preset,
)
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.model.vision.eva_vit import adapt_state_dict

OFFICIAL = "TinyGPT-V checkpoint"
EVA = "EVA ViT"
BLIP2 = "BLIP-2"

EVA_HEAD_DIM = 88  # LAVIS create_eva_vit_g builds num_heads = width // 88 (1408 -> 16)
QFORMER_HEAD_DIM = 64  # BERT-base: 768 / 12
DEFAULT_LORA_ALPHA = 16  # every official config
PEFT_PREFIX = "llama_model.base_model.model.model."  # stages 2-4: the LLM wrapped by peft
PLAIN_PREFIX = "llama_model.model."  # stage 1: no peft wrapper
QFORMER_POSITION_IDS = "Qformer.bert.embeddings.position_ids"

Rows = list[tuple[str, str, tuple[int, ...]]]  # (source key, our key, expected shape)


@dataclass
class OfficialConversion:
    """Everything a conversion decided, before anything is written: tests and `--dry-run`-style callers read it."""

    config: TinyGPTVConfig
    state: dict[str, torch.Tensor]  # our key names
    reports: list[FileReport]
    notes: list[str] = field(default_factory=list)
    phi2_dir: Path | None = None
    stage: int = 0

    def report(self, role: str) -> FileReport:
        return next(r for r in self.reports if r.role == role)

    def summary(self) -> str:
        cfg = self.config
        lora = f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha}" if cfg.lora.r else "no LoRA"
        lines = [f"TinyGPT-V stage {self.stage}: {cfg.vision.image_size} px, ViT depth {cfg.vision.depth}, "
                 f"{cfg.qformer.num_query_tokens} queries, {lora}, template {cfg.prompt.template!r}"]
        lines += [r.summary() for r in self.reports]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def convert_official(official_ckpt, phi2_dir, eva, blip2, out, *, stage: int | None = None,
                     image_size: int | None = None, vit_depth: int | None = None, vit_heads: int | None = None,
                     qformer_heads: int | None = None, lora_alpha: int | None = None, quiet: bool = False,
                     overwrite: bool = False) -> Path:
    """Convert and write our folder. Every dimension is read from the files (a tiny file in the official layout
    converts exactly like the real one); only what no tensor shape reveals (head counts, LoRA alpha, the image size)
    comes from the arguments, the checkpoint's own config, or the documented defaults. `out` is checked before the
    files are read, so a wrong --out fails at once."""
    check_output_dir(out, is_model_entry, overwrite=overwrite, what="model folder")
    conversion = plan_official(official_ckpt, phi2_dir, eva, blip2, stage=stage, image_size=image_size,
                               vit_depth=vit_depth, vit_heads=vit_heads, qformer_heads=qformer_heads,
                               lora_alpha=lora_alpha)
    path = write_converted(conversion, out, overwrite=overwrite)
    if not quiet:
        print(conversion.summary())
        print(f"wrote {path}")
    return path


def plan_official(official_ckpt, phi2_dir, eva, blip2, *, stage: int | None = None, image_size: int | None = None,
                  vit_depth: int | None = None, vit_heads: int | None = None, qformer_heads: int | None = None,
                  lora_alpha: int | None = None) -> OfficialConversion:
    tokenizer_files(phi2_dir)  # fail before reading gigabytes
    return plan_loaded(load_pth(official_ckpt, OFFICIAL), read_phi2(phi2_dir), load_pth(eva, EVA),
                       load_pth(blip2, BLIP2), stage=stage, image_size=image_size, vit_depth=vit_depth,
                       vit_heads=vit_heads, qformer_heads=qformer_heads, lora_alpha=lora_alpha)


def plan_loaded(official: LoadedFile, phi: Phi2Checkpoint, eva: LoadedFile, blip2: LoadedFile, *,
                stage: int | None = None, image_size: int | None = None, vit_depth: int | None = None,
                vit_heads: int | None = None, qformer_heads: int | None = None,
                lora_alpha: int | None = None) -> OfficialConversion:
    """The whole conversion on tensors already in memory; only shapes are read to decide, so real-size meta tensors
    can check the real layout without the real files."""
    notes = list(phi.notes)
    if official.config:
        notes.append(f"{official.path}: its 'config' entry (the training run config) was read for the stage, image "
                     "size and lora_alpha")
    resolved_stage = resolve_stage(stage, official.config, official.weights, notes)
    size = resolve_image_size(image_size, stage, resolved_stage, official.config, notes)
    vision_cfg, vision_state, eva_report = read_eva(eva, image_size=size, depth=vit_depth, heads=vit_heads,
                                                    notes=notes)
    q_layout, qformer_cfg, qformer_state, blip2_report = read_blip2(blip2, vit_width=vision_cfg.width,
                                                                    heads=qformer_heads)

    ledger = TensorLedger(OFFICIAL, official.path, official.weights)
    ledger.report.ignored_entries = official.ignored
    projector_hidden, projector_state = take_projector(ledger, qformer_cfg.hidden_size, phi.config.hidden_size)
    lora_r, lora_state = take_lora(ledger, phi.config)
    norm_state = take_llm_norms(ledger, phi.config, notes)
    trained_qformer = take_trained_qformer(ledger, q_layout, notes)
    ledger.skip("Q-Former position_ids buffer (no text input)", lambda k: k == QFORMER_POSITION_IDS)
    official_report = ledger.finish()

    alpha = resolve_lora_alpha(lora_alpha, official.config, lora_r, notes)
    prompt = dataclasses.replace(preset(f"tinygptv-stage{resolved_stage}").prompt, bos_at_inference=False)
    config = TinyGPTVConfig(
        vision=vision_cfg,
        qformer=qformer_cfg,
        projector=ProjectorConfig(hidden_size=projector_hidden),
        llm=phi.config,
        lora=LoRAConfig(r=lora_r, alpha=alpha if lora_r else LoRAConfig().alpha),
        prompt=prompt,
    )
    state = {**vision_state, **qformer_state, **trained_qformer, **projector_state,
             **llm_state(phi.state, phi.config), **norm_state, **lora_state}
    reports = [official_report, phi.report, eva_report, blip2_report]
    return OfficialConversion(config, state, reports, notes, phi.folder, resolved_stage)


# --- containers -----------------------------------------------------------------------------------------------------


@dataclass
class LoadedFile:
    path: str
    weights: dict[str, torch.Tensor]
    config: dict  # the LAVIS run config saved beside the weights, or {}
    ignored: list[str]  # other container entries (optimizer, scaler, epoch, ...): never read


def load_pth(path, role: str) -> LoadedFile:
    """Accepts the LAVIS container {"model": ..., "optimizer": ..., "config": ..., "scaler": ..., "epoch": ...} or a
    raw state dict; only the weights and the run config are used, the rest is listed as ignored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role} file {path}: not found")
    obj = read_pth(path, f"{role} file")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{role} file {path}: expected a dict, got {type(obj).__name__}")
    if isinstance(obj.get("model"), dict):
        weights = obj["model"]
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        ignored = [str(k) for k in obj if k != "model" and not (k == "config" and config)]
    else:
        weights, config, ignored = obj, {}, []
    not_tensors = [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{role} file {path}: entries that are not tensors: {not_tensors[:12]} (expected a "
                              "state dict, or a dict with the state dict under 'model')")
    return LoadedFile(str(path), dict(weights), config, ignored)


def _get(tree, *path):
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree


# --- what the shapes cannot tell ------------------------------------------------------------------------------------


def resolve_stage(stage: int | None, ckpt_config: dict, weights: dict, notes: list[str]) -> int:
    """The stage picks the prompt template. Taken from the argument, else from the checkpoint's own run config
    (arch minigpt_v2 is stage 4; the cc_sbu_align data set is stage 3), else from the weights (a trained Q-Former
    means stage 4, no LoRA means stage 1); stages 2 and 3 look alike, so the rest defaults to 3 with a note."""
    if stage is not None:
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1, 2, 3 or 4, not {stage!r}")
        return stage
    has_lora = any(".lora_A." in k for k in weights)
    has_qformer = "query_tokens" in weights
    datasets = _get(ckpt_config, "datasets") or {}
    if _get(ckpt_config, "model", "arch") == "minigpt_v2" or has_qformer:
        found = 4
    elif "cc_sbu_align" in datasets:
        found = 3
    elif not has_lora:
        found = 1
    elif {"laion", "cc_sbu"} & set(datasets):
        found = 2
    else:
        notes.append("stage 2 or 3 cannot be told apart from this checkpoint; using stage 3's prompt template "
                     "(--stage on the command line, stage= in Python)")
        return 3
    notes.append(f"stage {found} inferred from the checkpoint (--stage / stage= to override)")
    return found


def resolve_image_size(image_size: int | None, stage_arg: int | None, stage: int, ckpt_config: dict,
                       notes: list[str]) -> int:
    """Stages 1-3 ran at 224 px, stage 4 at 448 px. Order: the image_size argument, the stage argument, the
    checkpoint's config (model.image_size, then the data sets' train vis_processor), the inferred stage."""
    if image_size is not None:
        return image_size
    if stage_arg is not None:
        return 448 if stage_arg == 4 else 224
    from_model = _get(ckpt_config, "model", "image_size")
    if isinstance(from_model, int):
        return from_model
    datasets = _get(ckpt_config, "datasets") or {}
    sizes = {_get(d, "vis_processor", "train", "image_size") for d in datasets.values() if isinstance(d, dict)}
    sizes.discard(None)
    if len(sizes) == 1:
        return sizes.pop()
    if len(sizes) > 1:
        raise CheckpointError(f"the checkpoint's data sets use several image sizes {sorted(sizes)}; pass --image-size "
                              "(image_size= in Python)")
    size = 448 if stage == 4 else 224
    notes.append(f"image size not recorded in the checkpoint; using {size} px for stage {stage} "
                 "(--image-size or --stage to choose; image_size= / stage= in Python)")
    return size


def resolve_lora_alpha(alpha: int | None, ckpt_config: dict, r: int, notes: list[str]) -> int:
    """alpha scales LoRA (alpha / r) but leaves no trace in any tensor, so it comes from outside the weights."""
    if alpha is not None:
        return alpha
    from_config = _get(ckpt_config, "model", "lora_alpha")
    if isinstance(from_config, (int, float)):
        return int(from_config)
    if r:
        notes.append(f"lora_alpha not recorded in the checkpoint; using {DEFAULT_LORA_ALPHA} as every official "
                     "config does (--lora-alpha / lora_alpha= to choose)")
    return DEFAULT_LORA_ALPHA


def _needed(ledger: TensorLedger, key: str, ndim: int, what: str) -> torch.Tensor:
    tensor = ledger.peek(key)
    if tensor is None:
        raise ledger.fail(f"missing key {key}, needed to infer {what}")
    if tensor.dim() != ndim:
        raise ledger.fail(f"{key} has shape {tuple(tensor.shape)}; expected {ndim} dimensions ({what})")
    return tensor


def _sizes(ledger: TensorLedger, pattern: str, axis: int) -> list[int]:
    regex = re.compile(pattern)
    return [t.shape[axis] for k, t in ledger.tensors.items() if regex.match(k) and t.dim() > axis]


def _take_rows(ledger: TensorLedger, rows: Rows) -> dict[str, torch.Tensor]:
    state = {}
    for src, dst, shape in rows:
        tensor = ledger.take(src, shape)
        if tensor is not None:
            state[dst] = tensor
    return state


def _linear(src: str, dst: str, out_features: int, in_features: int) -> Rows:
    return [(f"{src}.weight", f"{dst}.weight", (out_features, in_features)),
            (f"{src}.bias", f"{dst}.bias", (out_features,))]


def _norm(src: str, dst: str, width: int) -> Rows:
    return [(f"{src}.weight", f"{dst}.weight", (width,)), (f"{src}.bias", f"{dst}.bias", (width,))]


# --- EVA ViT --------------------------------------------------------------------------------------------------------


def read_eva(eva: LoadedFile, *, image_size: int, depth: int | None, heads: int | None,
             notes: list[str]) -> tuple[VisionConfig, dict[str, torch.Tensor], FileReport]:
    ledger = TensorLedger(EVA, eva.path, eva.weights)
    ledger.report.ignored_entries = eva.ignored
    n_blocks = require_contiguous(layer_indices(ledger.keys(), r"^blocks\.(\d+)\."), "blocks", ledger)
    width = vote(_sizes(ledger, r"^blocks\.\d+\.norm1\.weight$", 0), "the ViT width (blocks.N.norm1.weight)", ledger)
    mlp_dim = vote(_sizes(ledger, r"^blocks\.\d+\.mlp\.fc1\.weight$", 0), "the ViT MLP size (blocks.N.mlp.fc1.weight)",
                   ledger)
    patch = _needed(ledger, "patch_embed.proj.weight", 4, "the patch size").shape[-1]
    grid = _square_grid(_needed(ledger, "pos_embed", 3, "the position grid"), ledger)
    kept = kept_vit_depth(n_blocks, depth, ledger)
    if image_size % patch:
        raise ledger.fail(f"image size {image_size} is not a multiple of the patch size {patch}")
    try:
        vit_heads = vit_head_count(width, heads)
    except ValueError as e:
        raise ledger.fail(str(e)) from None
    cfg = VisionConfig(image_size=image_size, patch_size=patch, width=width, depth=kept, heads=vit_heads,
                       mlp_dim=mlp_dim, pretrain_image_size=grid * patch)

    state = _take_rows(ledger, eva_rows(cfg, grid))
    ledger.skip(f"EVA blocks {kept}..{n_blocks - 1}: the model uses the output of block {kept - 1}",
                lambda k: (m := re.match(r"^blocks\.(\d+)\.", k)) is not None and int(m.group(1)) >= kept)
    ledger.skip("final norm / head (norm, fc_norm, head): unused, features are taken before them",
                lambda k: k.startswith(("norm.", "fc_norm.", "head.")))
    ledger.skip("rel_pos_bias: BLIP-2's ViT uses no relative position bias", lambda k: k.startswith("rel_pos_bias."))
    report = ledger.finish()
    if grid * patch != image_size:
        notes.append(f"EVA position grid {grid}x{grid} bicubic-interpolated to {image_size // patch}x"
                     f"{image_size // patch} for {image_size} px")
    adapted = adapt_state_dict({k[len("visual_encoder."):]: v for k, v in state.items()}, cfg)
    return cfg, {f"visual_encoder.{k}": v for k, v in adapted.items()}, report


def kept_vit_depth(n_blocks: int, depth: int | None, ledger: TensorLedger) -> int:
    """BLIP-2 (and so TinyGPT-V) feeds the Q-Former from the second-to-last block: LAVIS builds EVA-g with 39 of
    the file's 40 blocks. The default rule is therefore n_blocks - 1 for any file."""
    if depth is None:
        if n_blocks < 2:
            raise ledger.fail(f"has {n_blocks} block(s); keeping all but the last needs at least 2 (pass "
                              "--vit-depth, vit_depth= in Python)")
        return n_blocks - 1
    if not 1 <= depth <= n_blocks:
        raise ledger.fail(f"--vit-depth / vit_depth {depth} is outside 1..{n_blocks} (the file has {n_blocks} "
                          "blocks)")
    return depth


def vit_head_count(width: int, heads: int | None) -> int:
    """Head count leaves no trace in the shapes. LAVIS computes it as width // 88 (16 heads for EVA-g's 1408)."""
    if heads is not None:
        if heads < 1 or width % heads:
            raise ValueError(f"--vit-heads / vit_heads {heads} does not divide the ViT width {width}")
        return heads
    if width % EVA_HEAD_DIM:
        raise ValueError(f"ViT width {width} is not a multiple of {EVA_HEAD_DIM} (EVA's head size): pass "
                         "--vit-heads N (vit_heads= in Python)")
    return width // EVA_HEAD_DIM


def _square_grid(pos_embed: torch.Tensor, ledger: TensorLedger) -> int:
    patches = pos_embed.shape[1] - 1  # [1, 1 + g*g, W]: CLS first
    grid = int(round(patches**0.5))
    if grid * grid != patches:
        raise ledger.fail(f"pos_embed has {patches} patch positions, not a square grid")
    return grid


def eva_rows(cfg: VisionConfig, grid: int) -> Rows:
    w, m, p = cfg.width, cfg.mlp_dim, cfg.patch_size
    rows: Rows = [
        ("cls_token", "cls_token", (1, 1, w)),
        ("pos_embed", "pos_embed", (1, 1 + grid * grid, w)),
        ("patch_embed.proj.weight", "patch_embed.proj.weight", (w, 3, p, p)),
        ("patch_embed.proj.bias", "patch_embed.proj.bias", (w,)),
    ]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        rows += _norm(f"{b}norm1", f"{b}norm1", w) + _norm(f"{b}norm2", f"{b}norm2", w)
        rows += [(f"{b}attn.q_bias", f"{b}attn.q_bias", (w,)), (f"{b}attn.v_bias", f"{b}attn.v_bias", (w,)),
                 (f"{b}attn.qkv.weight", f"{b}attn.qkv.weight", (3 * w, w))]
        rows += _linear(f"{b}attn.proj", f"{b}attn.proj", w, w)
        rows += _linear(f"{b}mlp.fc1", f"{b}mlp.fc1", m, w) + _linear(f"{b}mlp.fc2", f"{b}mlp.fc2", w, m)
    return [(src, f"visual_encoder.{dst}", shape) for src, dst, shape in rows]


# --- BLIP-2 Q-Former ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QFormerLayout:
    hidden: int
    layers: int
    intermediate: int
    queries: int
    cross_layers: tuple[int, ...]
    cross_frequency: int
    encoder_width: int


BLIP2_SKIP_RULES = (
    ("Q-Former text head Qformer.cls (the queries never predict text)", lambda k: k.startswith("Qformer.cls.")),
    ("Q-Former text embeddings word_embeddings / position_embeddings / position_ids (queries only)",
     lambda k: k.startswith(("Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_embeddings.",
                             QFORMER_POSITION_IDS))),
    ("Q-Former text-path FFN layer.N.intermediate / layer.N.output (only the query FFN runs)",
     lambda k: re.match(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.", k) is not None),
    ("FlanT5 side t5_proj / t5_model", lambda k: k.startswith(("t5_proj.", "t5_model."))),
    ("BLIP-2's copy of the ViT visual_encoder (the ViT comes from the EVA file)",
     lambda k: k.startswith("visual_encoder.")),
    ("BLIP-2 pre-training heads vision_proj / text_proj / itm_head / temp",
     lambda k: k.startswith(("vision_proj.", "text_proj.", "itm_head.")) or k == "temp"),
)


def read_blip2(blip2: LoadedFile, *, vit_width: int,
               heads: int | None) -> tuple[QFormerLayout, QFormerConfig, dict[str, torch.Tensor], FileReport]:
    ledger = TensorLedger(BLIP2, blip2.path, blip2.weights)
    ledger.report.ignored_entries = blip2.ignored
    layout = infer_qformer(ledger)
    if layout.encoder_width != vit_width:
        raise ledger.fail(f"the Q-Former cross-attends to width {layout.encoder_width} but the EVA ViT is "
                          f"{vit_width} wide")
    try:
        qformer_heads = qformer_head_count(layout.hidden, heads)
    except ValueError as e:
        raise ledger.fail(str(e)) from None
    cfg = QFormerConfig(
        num_query_tokens=layout.queries, hidden_size=layout.hidden, num_layers=layout.layers, num_heads=qformer_heads,
        intermediate_size=layout.intermediate, cross_attention_frequency=layout.cross_frequency,
    )
    state = _take_rows(ledger, qformer_rows(layout))
    state |= _take_rows(ledger, _norm("ln_vision", "connector.ln_vision", vit_width))
    for rule, matches in BLIP2_SKIP_RULES:
        ledger.skip(rule, matches)
    return layout, cfg, state, ledger.finish()


def infer_qformer(ledger: TensorLedger) -> QFormerLayout:
    layer = r"^Qformer\.bert\.encoder\.layer\.(\d+)\."
    n_layers = require_contiguous(layer_indices(ledger.keys(), layer), "Qformer.bert.encoder.layer", ledger)

    def sizes(suffix: str, axis: int) -> list[int]:
        return _sizes(ledger, r"^Qformer\.bert\.encoder\.layer\.\d+\." + suffix + "$", axis)

    queries = _needed(ledger, "query_tokens", 3, "the number of queries").shape[1]
    hidden = vote(sizes(r"attention\.output\.LayerNorm\.weight", 0),
                  "the Q-Former width (layer.N.attention.output.LayerNorm.weight)", ledger)
    intermediate = vote(sizes(r"intermediate_query\.dense\.weight", 0),
                        "the Q-Former FFN size (layer.N.intermediate_query.dense.weight)", ledger)
    encoder_width = vote(sizes(r"crossattention\.self\.(key|value)\.weight", 1),
                         "the cross-attention input width (layer.N.crossattention.self.key/value.weight)", ledger)
    cross = tuple(layer_indices(ledger.keys(), layer + r"crossattention\."))
    return QFormerLayout(hidden, n_layers, intermediate, queries, cross, _cross_frequency(cross, n_layers, ledger),
                         encoder_width)


def _cross_frequency(cross: tuple[int, ...], n_layers: int, ledger: TensorLedger) -> int:
    """BLIP-2 cross-attends in layers 0, f, 2f, ...; transformers' Blip2QFormer takes f, so the set must fit one."""
    if not cross or cross[0] != 0:
        raise ledger.fail(f"cross-attention must start at layer 0; found it in layers {list(cross)}")
    frequency = cross[1] - cross[0] if len(cross) > 1 else n_layers
    if tuple(range(0, n_layers, frequency)) != cross:
        raise ledger.fail(f"cross-attention layers {list(cross)} are not every {frequency}th layer from 0")
    return frequency


def qformer_head_count(hidden: int, heads: int | None) -> int:
    """BERT-base's heads are 64 wide (768 -> 12); no tensor shape shows the head count."""
    if heads is not None:
        if heads < 1 or hidden % heads:
            raise ValueError(f"--qformer-heads / qformer_heads {heads} does not divide the Q-Former width {hidden}")
        return heads
    if hidden % QFORMER_HEAD_DIM:
        raise ValueError(f"Q-Former width {hidden} is not a multiple of {QFORMER_HEAD_DIM}: pass "
                         "--qformer-heads N (qformer_heads= in Python)")
    return hidden // QFORMER_HEAD_DIM


def qformer_rows(q: QFormerLayout) -> Rows:
    """LAVIS names -> transformers' Blip2QFormerModel names (attention.self -> attention.attention, ...)."""
    h, i, e = q.hidden, q.intermediate, q.encoder_width
    rows: Rows = [("query_tokens", "connector.query_tokens", (1, q.queries, h))]
    rows += _norm("Qformer.bert.embeddings.LayerNorm", "connector.qformer.layernorm", h)
    for n in range(q.layers):
        src, dst = f"Qformer.bert.encoder.layer.{n}.", f"connector.qformer.encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            rows += _linear(f"{src}attention.self.{proj}", f"{dst}attention.attention.{proj}", h, h)
        rows += _linear(f"{src}attention.output.dense", f"{dst}attention.output.dense", h, h)
        rows += _norm(f"{src}attention.output.LayerNorm", f"{dst}attention.output.LayerNorm", h)
        if n in q.cross_layers:
            for proj, width_in in (("query", h), ("key", e), ("value", e)):
                rows += _linear(f"{src}crossattention.self.{proj}", f"{dst}crossattention.attention.{proj}", h,
                                width_in)
            rows += _linear(f"{src}crossattention.output.dense", f"{dst}crossattention.output.dense", h, h)
            rows += _norm(f"{src}crossattention.output.LayerNorm", f"{dst}crossattention.output.LayerNorm", h)
        rows += _linear(f"{src}intermediate_query.dense", f"{dst}intermediate_query.dense", i, h)
        rows += _linear(f"{src}output_query.dense", f"{dst}output_query.dense", h, i)
        rows += _norm(f"{src}output_query.LayerNorm", f"{dst}output_query.LayerNorm", h)
    return rows


# --- the TinyGPT-V checkpoint ---------------------------------------------------------------------------------------


def take_projector(ledger: TensorLedger, qformer_width: int, llm_width: int) -> tuple[int, dict[str, torch.Tensor]]:
    sizes = _sizes(ledger, r"^llama_proj\.(weight|bias)$", 0) + _sizes(ledger, r"^llama_proj2\.weight$", 1)
    hidden = vote(sizes, "the projector width (llama_proj.weight / llama_proj2.weight)", ledger)
    rows = _linear("llama_proj", "projector.llama_proj", hidden, qformer_width)
    rows += _linear("llama_proj2", "projector.llama_proj2", llm_width, hidden)
    return hidden, _take_rows(ledger, rows)


def llm_prefix(ledger: TensorLedger) -> str:
    """peft wraps the LLM in stages 2-4 (llama_model.base_model.model.model.*); stage 1 has no wrapper."""
    peft = any(k.startswith(PEFT_PREFIX) for k in ledger.keys())
    plain = any(k.startswith(PLAIN_PREFIX) for k in ledger.keys())
    if peft and plain:
        raise ledger.fail(f"mixes LLM keys with and without the peft wrapper ({PEFT_PREFIX}* and {PLAIN_PREFIX}*)")
    return PLAIN_PREFIX if plain else PEFT_PREFIX


def take_lora(ledger: TensorLedger, llm: LLMConfig) -> tuple[int, dict[str, torch.Tensor]]:
    """LoRA on the fused query_key_value and on dense. The QKV B rows are in the same (head, q/k/v, head_dim) order
    as our fused weight, so they copy as they are. Keys with and without peft's '.default.' are both accepted."""
    prefix = llm_prefix(ledger)
    a_pattern = rf"^{re.escape(prefix)}layers\.\d+\.self_attn\.(query_key_value|dense)\.lora_A(\.default)?\.weight$"
    ranks = _sizes(ledger, a_pattern, 0)
    if not ranks:
        return 0, {}
    r, d = vote(ranks, "the LoRA rank (lora_A.weight)", ledger), llm.hidden_size
    state = {}
    for i in range(llm.num_layers):
        for target, out_features in (("query_key_value", 3 * d), ("dense", d)):
            for matrix, shape in (("lora_A", (r, d)), ("lora_B", (out_features, r))):
                src = _lora_key(ledger, f"{prefix}layers.{i}.self_attn.{target}.{matrix}")
                tensor = ledger.take(src, shape)
                if tensor is not None:
                    state[f"llm.model.layers.{i}.self_attn.{target}.{matrix}.default.weight"] = tensor
    return r, state


def _lora_key(ledger: TensorLedger, stem: str) -> str:
    plain, default = f"{stem}.weight", f"{stem}.default.weight"
    if plain in ledger and default in ledger:
        raise ledger.fail(f"holds both {plain} and {default}")
    return default if default in ledger else plain


def take_llm_norms(ledger: TensorLedger, llm: LLMConfig, notes: list[str]) -> dict[str, torch.Tensor]:
    """The trained norm weights. Every released stage carries all of them, so a partial set is an error; a file
    with none keeps Phi-2's input/final norms and TinyGPT-V's new norms at weight 1."""
    prefix = llm_prefix(ledger)
    d, head_dim = llm.hidden_size, llm.hidden_size // llm.num_heads
    rows: Rows = [(f"{prefix}final_layernorm.weight", "llm.model.final_layernorm.weight", (d,))]
    for i in range(llm.num_layers):
        layer = f"layers.{i}."
        for name, width in (("self_attn.q_layernorm.weight", head_dim), ("self_attn.k_layernorm.weight", head_dim),
                            ("input_layernorm.weight", d), ("post_layernorm.weight", d)):
            rows.append((f"{prefix}{layer}{name}", f"llm.model.{layer}{name}", (width,)))
    if not any(src in ledger for src, _, _ in rows):
        notes.append(f"{ledger.path}: no LLM norm weights; q/k/post norms stay at weight 1, input/final norms "
                     "come from Phi-2")
        return {}
    return _take_rows(ledger, rows)


def take_trained_qformer(ledger: TensorLedger, layout: QFormerLayout, notes: list[str]) -> dict[str, torch.Tensor]:
    """The Dec-2023 stage-4 file trained the Q-Former and query_tokens: when present they replace BLIP-2's, and the
    whole set must be there (a partial Q-Former would silently mix two trainings)."""
    present = "query_tokens" in ledger or any(
        k.startswith("Qformer.bert.") and k != QFORMER_POSITION_IDS for k in ledger.keys())
    if not present:
        return {}
    notes.append(f"{ledger.path}: carries a trained Q-Former and query_tokens; they override the BLIP-2 file's")
    return _take_rows(ledger, qformer_rows(layout))


def llm_state(phi_state: dict[str, torch.Tensor], llm: LLMConfig) -> dict[str, torch.Tensor]:
    """Phi-2's weights plus TinyGPT-V's added norms at their initial values (LayerNorm 1/0, RMSNorm 1), which
    the checkpoint's trained weights then override. The q/k LayerNorm biases never trained: they stay 0."""
    d, head_dim = llm.hidden_size, llm.hidden_size // llm.num_heads
    state = {}
    for i in range(llm.num_layers):
        p = f"llm.model.layers.{i}."
        for norm in ("q_layernorm", "k_layernorm"):
            state[f"{p}self_attn.{norm}.weight"] = torch.ones(head_dim)
            state[f"{p}self_attn.{norm}.bias"] = torch.zeros(head_dim)
        state[f"{p}post_layernorm.weight"] = torch.ones(d)
    state.update(phi_state)
    return state


# --- writing --------------------------------------------------------------------------------------------------------


def write_converted(conversion: OfficialConversion, out, *, overwrite: bool = False) -> Path:
    """Strict load into the model (the last check that every key and shape fits), then save_pretrained plus the Phi-2
    tokenizer files, byte for byte, into the same staged folder."""
    with torch.device("meta"):
        model = TinyGPTV(conversion.config, tokenizer=None)
    load_into(model, conversion.state, "converted official weights")
    with writing_dir(out, is_model_entry, overwrite=overwrite, what="model folder", marker=CONFIG_NAME) as staged:
        copy_tokenizer_files(conversion.phi2_dir, staged)
        write_model_files(model, staged)
    return Path(out)
