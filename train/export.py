"""Hugging Face Llama format: `plait export CKPT OUT`, and initializing a model from such a directory.

Export reassembles every parameter in full from the checkpoint's tp shards (any layout),
cuts the vocabulary padding, renames to `LlamaForCausalLM`'s names (`MistralForCausalLM` for a model with
`model.sliding_window`: the same names, and its window in config.json; `Qwen3ForCausalLM` for a model with
`model.qk_norm`: the same names plus each attention's q_norm and k_norm; `Qwen2ForCausalLM` with
`model.qkv_bias`: plus q, k and v biases; for a mixture of experts `MixtralForCausalLM`, `Qwen3MoeForCausalLM` with
QK-norm, `Qwen2MoeForCausalLM` with a shared expert, each with its per-expert names; `DeepseekV3ForCausalLM` for a
model with `model.attention=mla`, dense or routed as DeepSeek-V3 routes: train/hf_deepseek.py) and writes
`OUT/config.json` and `OUT/model.safetensors`, and, when the checkpoint's data was made with a BPE
(its index records the tokenizer.json), `OUT/tokenizer.json` and `OUT/tokenizer_config.json` for
transformers' `AutoTokenizer` (a byte-level model's ids are UTF-8 bytes: no tokenizer file; its
`eos_token_id` 0 is set):

    embed.weight                  -> model.embed_tokens.weight
    layers.i.attn_norm.weight     -> model.layers.i.input_layernorm.weight
    layers.i.attn.wqkv.weight     -> model.layers.i.self_attn.{q,k,v}_proj.weight (split by segment)
    layers.i.attn.wo.weight       -> model.layers.i.self_attn.o_proj.weight
    layers.i.mlp_norm.weight      -> model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.w13.weight       -> model.layers.i.mlp.{gate,up}_proj.weight (split by segment)
    layers.i.mlp.w2.weight        -> model.layers.i.mlp.down_proj.weight
    layers.i.attn.{q,k}_norm.weight -> model.layers.i.self_attn.{q,k}_norm.weight (qk_norm: Qwen3)
    layers.i.attn.wqkv.bias       -> model.layers.i.self_attn.{q,k,v}_proj.bias (qkv_bias: Qwen2)
    norm.weight, head.weight      -> model.norm.weight, lm_head.weight (absent when tied)

plait rotates (first half, second half) of each head, as HF Llama's `rotate_half` does, so
q and k need no permutation. muP multipliers HF Llama does not have are folded into the
weights: the embedding multiplier into the embedding, the logits multiplier into the
final norm's gain (divided by the embedding multiplier when the head is tied), and an
attention scale other than 1/sqrt(head_dim) into q_proj (into q_norm's gain under QK-norm, which
would undo a scaled q_proj), and a mixture of experts' router multiplier into each router (gate) and
shared-expert gate. Import undoes the same folding.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load as safetensors_load

from plait.common.paths import unwritable_reason
from plait.parallel.plans import param_specs
from plait.train import hf_deepseek as deepseek
from plait.train.reshard import CheckpointError, load_full_model, resolve_checkpoint
from plait.train.tensorfile import write_atomic, write_safetensors

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"

# plait name suffix -> HF name suffix, for the weights that map one to one
_SIMPLE = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_DENSE_MLP = {"mlp.w2.weight": "mlp.down_proj.weight"}
_QK_NORMS = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
_FUSED = {"attn.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")}
_FUSED_BIAS = {"attn.wqkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")}  # Qwen2
_DENSE_FUSED = {"mlp.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
MIXTRAL_MOE = "block_sparse_moe"  # Mixtral's name for its MoE block in the Hub's checkpoints
# a mixture of experts' names in a family's checkpoints: (block, router, expert's gate, up, down projections)
_MOE_NAMES = {"mixtral": (MIXTRAL_MOE, "gate", "w1", "w3", "w2"),
              "qwen2_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
              "qwen3_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
              deepseek.KIND: ("mlp", "gate", "gate_proj", "up_proj", "down_proj")}


def _layer_tables(model: Dict[str, Any]):
    """(one-to-one names, fused names -> their segments' names) of a layer: QK-norm's gains and q/k/v biases where
    the model has them, latent attention's projections, and the dense MLP's, or a mixture of experts' as its
    family's checkpoints name them (Mixtral: router -> gate, each expert's gate|up -> w1, w3, down -> w2; Qwen:
    router -> gate, gate_proj, up_proj, down_proj, and the shared expert and its gate)."""
    experts, kind = int(model.get("moe_experts") or 0), model_type(model)
    if kind == deepseek.KIND:  # latent attention: one-to-one names
        simple, fused = {**_SIMPLE, **deepseek.attention_names(model)}, {}
    else:
        simple = {**_SIMPLE, **(_QK_NORMS if model.get("qk_norm") else {})}
        fused = {**_FUSED, **(_FUSED_BIAS if model.get("qkv_bias") else {})}
    if not experts:
        return {**simple, **_DENSE_MLP}, {**fused, **_DENSE_FUSED}
    block, router, gate, up, down = _MOE_NAMES[kind]
    simple["mlp.router.weight"] = f"{block}.{router}.weight"
    for e in range(experts):
        ours, theirs = f"mlp.experts.{e}.", f"{block}.experts.{e}."
        simple[ours + "w2.weight"] = f"{theirs}{down}.weight"
        fused[ours + "w13.weight"] = (f"{theirs}{gate}.weight", f"{theirs}{up}.weight")
    if kind == deepseek.KIND:
        if model.get("moe_bias_update_rate"):
            simple[deepseek.ROUTER_BIAS[0]] = deepseek.ROUTER_BIAS[1]
        if model.get("moe_shared_ffn_dim"):
            simple.update(deepseek.SHARED)
            fused.update(deepseek.SHARED_FUSED)
    elif model.get("moe_shared_ffn_dim"):
        simple.update({"mlp.shared_gate.weight": "mlp.shared_expert_gate.weight",
                       "mlp.shared.w2.weight": "mlp.shared_expert.down_proj.weight"})
        fused["mlp.shared.w13.weight"] = ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight")
    return simple, fused


_QWEN = ("qwen2", "qwen3")
_ADDS = {"qk_norm": "QK-norm", "qkv_bias": "q, k and v biases"}  # what an attention setting adds, in words
# the settings a model has -> the Hugging Face model_type it exports as
_FAMILIES = {frozenset(): "llama", frozenset({"sliding_window"}): "mistral", frozenset({"qk_norm"}): "qwen3",
             frozenset({"qkv_bias"}): "qwen2", frozenset({"moe_experts"}): "mixtral",
             frozenset({"moe_experts", "sliding_window"}): "mixtral",
             frozenset({"moe_experts", "qk_norm"}): "qwen3_moe",
             frozenset({"moe_experts", "moe_shared_ffn_dim"}): "qwen2_moe",
             frozenset({"moe_experts", "moe_shared_ffn_dim", "qkv_bias"}): "qwen2_moe"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", deepseek.KIND: deepseek.ARCHITECTURE}


def model_type(model: Dict[str, Any]) -> str:
    """The Hugging Face model_type a plait model (its recorded config) exports as, or a CheckpointError in one
    line naming the settings no architecture plait writes has."""
    if model.get("attention", "mha") == "mla":  # DeepSeek-V3's, if its routing is too
        why = deepseek.refusal(model)
        if why is not None:
            raise CheckpointError(why)
        return deepseek.KIND
    features = frozenset(key for key in ("qk_norm", "qkv_bias", "sliding_window", "moe_experts", "moe_shared_ffn_dim")
                         if model.get(key))
    kind = _FAMILIES.get(features)
    if kind is None:
        raise CheckpointError(f"a model with {' and '.join('model.' + key for key in sorted(features))} has no Hugging "
                              f"Face architecture plait writes (Qwen3: qk_norm, Qwen2: qkv_bias, Mistral: "
                              f"sliding_window, Mixtral: moe_experts with or without sliding_window, Qwen3-MoE: "
                              f"moe_experts and qk_norm, Qwen2-MoE: moe_experts and moe_shared_ffn_dim with or without "
                              f"qkv_bias); export a model with one of these.")
    for key, plain in (("moe_score_function", "softmax"), ("moe_topk_scaling_factor", 1.0), ("moe_shared_gate", True),
                       ("moe_router_groups", 1)):
        value = model.get(key, plain)
        if model.get("moe_experts") and value != plain:
            raise CheckpointError(f"model.{key}={value} routes as DeepSeek-V3 does, which no export family "
                                  f"(Mixtral, Qwen2-MoE, Qwen3-MoE) can hold; export a model trained without it.")
    if model.get("moe_experts") and model.get("moe_bias_update_rate"):
        raise CheckpointError(f"model.moe_bias_update_rate={model['moe_bias_update_rate']} routed by a learned bias "
                              f"per expert (DeepSeek-V3's) that {_ARCHITECTURES[kind]} has no place for, so it would "
                              f"pick other experts; export a model trained with model.moe_bias_update_rate=0.")
    if kind == "mixtral" and not model.get("moe_norm_topk", True):
        raise CheckpointError("Mixtral renormalizes each token's top-k router weights but model.moe_norm_topk=false; "
                              "train with model.moe_norm_topk=true, or with model.qk_norm (Qwen3-MoE) or "
                              "model.moe_shared_ffn_dim (Qwen2-MoE), whose configs record it.")
    return kind


def hf_config(model: Dict[str, Any]) -> Dict[str, Any]:
    """`config.json` of a `LlamaForCausalLM` with plait's model shape (older and newer rope keys both); with a
    sliding window, of a `MistralForCausalLM` (the same weights and names, plus `sliding_window`); with QK-norm,
    of a `Qwen3ForCausalLM` (plus q_norm and k_norm); with q, k and v biases, of a `Qwen2ForCausalLM`; with experts,
    of a `MixtralForCausalLM` (its window too, if any), with QK-norm a `Qwen3MoeForCausalLM`, with a shared expert
    a `Qwen2MoeForCausalLM`; with latent attention, of a `DeepseekV3ForCausalLM` (`model_type`)."""
    head_dim = model["dim"] // model["n_heads"]
    kind = model_type(model)
    architecture = {"architectures": [_ARCHITECTURES[kind]], "model_type": kind}
    if kind == "mixtral":
        architecture.update(sliding_window=model.get("sliding_window"), router_jitter_noise=0.0, **_experts_keys(model, kind))
    elif kind in _QWEN_MOE:
        architecture.update(use_sliding_window=False, sliding_window=None, max_window_layers=model["n_layers"],
                            num_experts=model["moe_experts"], moe_intermediate_size=model["ffn_dim"],
                            norm_topk_prob=bool(model.get("moe_norm_topk", True)), decoder_sparse_step=1,
                            mlp_only_layers=[], **_experts_keys(model, kind))
        if kind == "qwen2_moe":
            architecture.update(shared_expert_intermediate_size=model["moe_shared_ffn_dim"],
                                qkv_bias=bool(model.get("qkv_bias")))
    elif kind in _QWEN:
        architecture.update(use_sliding_window=False, sliding_window=None, max_window_layers=model["n_layers"])
    elif kind == "mistral":
        architecture.update(sliding_window=model["sliding_window"])
    if kind == deepseek.KIND:
        architecture.update(deepseek.config_keys(model))  # (its own head_dim and key-value heads among them)
    return {
        "vocab_size": model["vocab_size"], "hidden_size": model["dim"], "intermediate_size": model["ffn_dim"],
        "num_hidden_layers": model["n_layers"], "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"], "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": model["max_seq_len"], "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"], **_rope_keys(model),
        "tie_word_embeddings": bool(model["tie_embeddings"]), "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": model.get("init_std", 0.02), "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32", "dtype": "float32",
        **architecture,
    }


def _experts_keys(model: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """The keys a mixture of experts' config.json shares among Mixtral, Qwen2-MoE and Qwen3-MoE (`kind`)."""
    experts = {"num_local_experts": model["moe_experts"]} if kind == "mixtral" else {}
    return {**experts, "num_experts_per_tok": model["moe_top_k"], "router_aux_loss_coef": model["moe_aux_loss"],
            "output_router_logits": False}


# plait's rope settings of each scaling -> Hugging Face's rope parameter names
_ROPE_KEYS = {"llama3": {"rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
                         "rope_high_freq_factor": "high_freq_factor",
                         "rope_original_max_len": "original_max_position_embeddings"},
              "yarn": {"rope_factor": "factor", "rope_original_max_len": "original_max_position_embeddings",
                       "rope_beta_fast": "beta_fast", "rope_beta_slow": "beta_slow", "rope_mscale": "mscale",
                       "rope_mscale_all_dim": "mscale_all_dim"}}
_YARN_DEFAULTS = {"rope_beta_fast": 32.0, "rope_beta_slow": 1.0, "rope_mscale": 0.0, "rope_mscale_all_dim": 0.0}


def _rope_keys(model: Dict[str, Any]) -> Dict[str, Any]:
    """`rope_parameters` (newer transformers) and, for Llama 3.1's or YaRN's scaling, `rope_scaling` (older ones)."""
    kind = model.get("rope_scaling")
    if kind not in _ROPE_KEYS:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": model["rope_theta"]}}
    scaling = {"rope_type": kind, **{hf: model[ours] for ours, hf in _ROPE_KEYS[kind].items()}}
    return {"rope_parameters": {**scaling, "rope_theta": model["rope_theta"]}, "rope_scaling": scaling}


def _segments(model: Dict[str, Any], fused: str) -> List[int]:
    head_dim = model["dim"] // model["n_heads"]
    if fused.startswith("attn.wqkv."):
        return [model["n_heads"] * head_dim, model["n_kv_heads"] * head_dim, model["n_kv_heads"] * head_dim]
    width = model["moe_shared_ffn_dim"] if fused.startswith("mlp.shared.") else model["ffn_dim"]
    return [width, width]


def _fold_factors(model: Dict[str, Any], scales: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """Multipliers that move plait's muP scales into the weights HF Llama has."""
    scales = scales or {}
    embedding = float(scales.get("embedding", 1.0))
    logits = float(scales.get("logits", 1.0))
    latent = model.get("attention", "mha") == "mla"
    head_dim = deepseek.dims_of(model).qk if latent else model["dim"] // model["n_heads"]
    attention = scales.get("attention")
    query = 1.0 if attention is None else float(attention) * math.sqrt(head_dim)
    norm = logits / embedding if model["tie_embeddings"] else logits
    # what takes the query scale: q_norm's gain (it would undo a scaled q_proj), else q_proj and its bias, or latent
    # attention's query projection whole
    query_into = ("attn.q_norm.weight",) if model.get("qk_norm") else ("attn.wqkv.weight", "attn.wqkv.bias")
    if latent:
        query_into = ("attn.wq.weight", "attn.wq_b.weight")
    return {"embed": embedding, "norm": norm, "query": query, "query_into": query_into,
            "router": float(scales.get("router", 1.0)), "router_into": ("mlp.router.weight", "mlp.shared_gate.weight")}


def _fold_of(fold: Dict[str, Any], rest: str) -> float:
    """What a one-to-one weight `rest` of a layer is multiplied by on the way out (divided by on the way in): muP's
    router multiplier, or the query scale (QK-norm's q gain, latent attention's query projection)."""
    if rest in fold["router_into"]:
        return fold["router"]
    return fold["query"] if rest in fold["query_into"] else 1.0


def to_hf(model: Dict[str, Any], full: Dict[str, torch.Tensor],
          scales: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """plait's full tensors (vocabulary padding cut) as the Hugging Face family's state dict (`model_type`; multi-token
    prediction's left out)."""
    fold = _fold_factors(model, scales)
    simple, fused = _layer_tables(model)
    out = {}
    for name, tensor in full.items():
        tensor = tensor.float() if tensor.dtype != torch.float32 else tensor
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = tensor * fold["embed"] if fold["embed"] != 1.0 else tensor
        elif name == "norm.weight":
            out["model.norm.weight"] = tensor * fold["norm"] if fold["norm"] != 1.0 else tensor
        elif name == "head.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("mtp."):
            continue  # multi-token prediction trains the model; inference has no use for it (DeepSeek-V3 drops it)
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            prefix = f"model.layers.{index}."
            if rest in simple:
                factor = _fold_of(fold, rest)
                out[prefix + simple[rest]] = tensor * factor if factor != 1.0 else tensor
            elif rest in fused:
                parts = list(tensor.split(_segments(model, rest), dim=0))
                if rest in fold["query_into"] and fold["query"] != 1.0:  # the first segment is the query's
                    parts[0] = parts[0] * fold["query"]
                out.update({prefix + hf_name: part for part, hf_name in zip(parts, fused[rest])})
            else:
                raise CheckpointError(f"parameter {name} has no Hugging Face Llama counterpart.")
        else:
            raise CheckpointError(f"parameter {name} has no Hugging Face Llama counterpart.")
    if model_type(model) == deepseek.KIND and model.get("moe_experts") and not model.get("moe_bias_update_rate"):
        out.update(deepseek.zero_biases(model))  # its router always holds a correction bias: none, here
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_hf(model: Dict[str, Any], hf: Dict[str, torch.Tensor],
            scales: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """HF Llama's state dict as plait's full tensors (unpadded vocabulary), undoing `to_hf`'s folding."""
    fold = _fold_factors(model, scales)
    full = {"embed.weight": hf["model.embed_tokens.weight"] / fold["embed"] if fold["embed"] != 1.0
            else hf["model.embed_tokens.weight"],
            "norm.weight": hf["model.norm.weight"] / fold["norm"] if fold["norm"] != 1.0 else hf["model.norm.weight"]}
    if not model["tie_embeddings"]:
        full["head.weight"] = hf["lm_head.weight"]
    simple, fused = _layer_tables(model)
    for index in range(model["n_layers"]):
        prefix = f"model.layers.{index}."
        for rest, hf_name in simple.items():
            factor = _fold_of(fold, rest)
            full[f"layers.{index}.{rest}"] = hf[prefix + hf_name] / factor if factor != 1.0 else hf[prefix + hf_name]
        for rest, hf_names in fused.items():
            parts = [hf[prefix + hf_name] for hf_name in hf_names]
            if rest in fold["query_into"] and fold["query"] != 1.0:
                parts[0] = parts[0] / fold["query"]
            full[f"layers.{index}.{rest}"] = torch.cat(parts, dim=0)
    return full


def export_checkpoint(checkpoint: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `checkpoint` (any layout; a checkpoint directory, a checkpoint root or a run directory) as one HF Llama
    directory `out`; returns `out`.

    A new `out` appears whole or not at all (written under a temporary name, then renamed).
    """
    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    reason = unwritable_reason(str(out))
    if reason is not None:
        raise CheckpointError(f"{out} cannot take the export ({reason}); pass a new or empty directory.")
    index, full = load_full_model(checkpoint)
    model = index["model"]
    tensors = {name: tensor.to(dtype) for name, tensor in to_hf(model, full, index.get("scales")).items()}
    config = hf_config(model)
    config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    tokenizer = _recorded_tokenizer(index)
    if tokenizer is not None:
        config["eos_token_id"] = tokenizer.eos
    target = out if out.exists() else out.with_name(f".tmp-{out.name}.{os.getpid()}")
    target.mkdir(parents=True, exist_ok=True)
    try:
        write_safetensors(target / HF_WEIGHTS, tensors)
        write_atomic(target / HF_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
        if tokenizer is not None and tokenizer.to_json() is not None:
            _write_tokenizer(target, tokenizer, model["max_seq_len"])
        if target != out:
            os.replace(target, out)
    except OSError as error:
        if target != out:
            shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"writing {out} failed ({error.strerror or error}); nothing was left there, free "
                              f"space or pick another directory.") from None
    return out


def _recorded_tokenizer(index: Dict[str, Any]):
    """The tokenizer the checkpoint's data was made with (`"tokenizer"` in its index), or None: not recorded, or
    its tokenizer.json no longer where it was."""
    from plait.data.errors import DataError
    from plait.data.tokenizer import from_spec

    spec = index.get("tokenizer")
    if spec is None:
        return None
    try:
        return from_spec(spec)
    except DataError:
        return None


def _write_tokenizer(target: Path, tokenizer, max_seq_len: int) -> None:
    """tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads (a fast tokenizer)."""
    eos = tokenizer.tokenizer.id_to_token(tokenizer.eos)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": max_seq_len,
                "clean_up_tokenization_spaces": False}
    write_atomic(target / "tokenizer.json", tokenizer.to_json().encode())
    write_atomic(target / "tokenizer_config.json", (json.dumps(settings, indent=2) + "\n").encode())


_SHAPE_KEYS = {"vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "ffn_dim",
               "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
               "num_key_value_heads": "n_kv_heads", "tie_word_embeddings": "tie_embeddings"}


def _rope(config: Dict[str, Any]) -> Dict[str, Any]:
    """The rotary settings of a config.json, older (`rope_theta`, `rope_scaling`) and newer (`rope_parameters`) keys:
    theta, type, and the scaling's own numbers by plait's names."""
    params = dict(config.get("rope_parameters") or {})
    scaling = {**params, **(config.get("rope_scaling") or {})}
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    numbers = {**(_YARN_DEFAULTS if kind == "yarn" else {}),
               **{ours: scaling[hf] for ours, hf in _ROPE_KEYS.get(kind, {}).items() if scaling.get(hf) is not None}}
    unsupported = [f"{key}={scaling[key]}" for key, plain in (("attention_factor", None), ("truncate", True))
                   if kind == "yarn" and scaling.get(key, plain) != plain]
    return {"theta": float(params.get("rope_theta", config.get("rope_theta", 10000.0))), "type": kind,
            "unsupported": unsupported, **numbers}


def _check_rope_scaling(rope: Dict[str, Any], cfg, where: Path) -> None:
    """A Llama 3.1 (or YaRN) directory loads into a model with the same llama3 (yarn) numbers; an unscaled one into
    an unscaled model."""
    theirs = None if rope["type"] in (None, "default") else rope["type"]
    if theirs not in (None, *_ROPE_KEYS) or rope["unsupported"]:
        what = f"type {theirs}" if theirs not in (None, *_ROPE_KEYS) else \
            f"{theirs} with {', '.join(rope['unsupported'])}"
        raise CheckpointError(f"{where}: rope_scaling {what} (plait computes llama3 or yarn scaling with its own "
                              f"attention factor and truncated ramp, or none); plait's decoder cannot load it.")
    ours = cfg.rope_scaling
    keys = _ROPE_KEYS.get(theirs, {})
    wanted = {key: rope[key] for key in keys if key in rope} if theirs else {}
    if theirs != ours or any(float(getattr(cfg, key)) != float(value) for key, value in wanted.items()):
        numbers = "".join(f", {hf}={rope[key]:g}" for key, hf in keys.items() if key in wanted)
        settings = " ".join([f"model.rope_scaling={theirs or 'null'}"]
                            + [f"model.{key}={value:g}" for key, value in wanted.items()])
        raise CheckpointError(f"{where} has rope_scaling={theirs or 'null'}{numbers} but model.rope_scaling="
                              f"{ours or 'null'}; set {settings} to load it.")


_WINDOWED = ("mistral", "mixtral")  # the model types whose config.json's sliding_window plait reads


_QWEN_MOE = ("qwen2_moe", "qwen3_moe")
# the model settings besides the shape that name a model's weights (`_layer_tables`)
_FROM_CFG = ("max_seq_len", "qk_norm", "qkv_bias", "sliding_window", "moe_experts", "moe_norm_topk",
             "moe_shared_ffn_dim", "moe_top_k", "moe_score_function", "moe_shared_gate", "moe_router_groups",
             "moe_router_group_topk", "moe_topk_scaling_factor", "moe_bias_update_rate", "attention", "q_lora_rank",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _experts_of(config: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """The mixture-of-experts settings of a config.json by plait's names (transformers' defaults where a key is
    absent; no experts for a dense model type). The expert count is `num_local_experts` or `num_experts` in
    either family (transformers maps one name to the other and saves either)."""
    if kind == deepseek.KIND:
        return deepseek.experts_of(config)
    if kind not in ("mixtral", *_QWEN_MOE):
        return {"moe_experts": 0}
    count = config.get("num_local_experts", config.get("num_experts"))
    if kind == "mixtral":
        return {"moe_experts": int(count or 8), "moe_top_k": int(config.get("num_experts_per_tok", 2)),
                "moe_norm_topk": True, "moe_shared_ffn_dim": 0,
                "moe_aux_loss": float(config.get("router_aux_loss_coef", 0.01))}
    qwen2 = kind == "qwen2_moe"
    return {"moe_experts": int(count or (60 if qwen2 else 128)),
            "moe_top_k": int(config.get("num_experts_per_tok", 4 if qwen2 else 8)),
            "moe_norm_topk": bool(config.get("norm_topk_prob", False)),
            "moe_shared_ffn_dim": int(config.get("shared_expert_intermediate_size", 5632)) if qwen2 else 0,
            "moe_aux_loss": float(config.get("router_aux_loss_coef", 0.001))}


def _attention_of(config: Dict[str, Any], kind: str) -> Dict[str, bool]:
    """Whether a config.json's attention has QK-norm (Qwen3, Qwen3-MoE) and q, k, v biases (Qwen2, Qwen2-MoE)."""
    return {"qk_norm": kind in ("qwen3", "qwen3_moe"),
            "qkv_bias": kind == "qwen2" or (kind == "qwen2_moe" and bool(config.get("qkv_bias", True)))}


def _ffn_of(config: Dict[str, Any], kind: str) -> Optional[int]:
    """The width of plait's MLP (of each expert): Qwen's MoE configs hold it apart from the dense layers' width."""
    if kind == deepseek.KIND:
        routed = deepseek.experts_of(config)["moe_experts"]
        return config.get("moe_intermediate_size" if routed else "intermediate_size")
    return config.get("moe_intermediate_size") if kind in _QWEN_MOE else config.get("intermediate_size")


def _check_experts(config: Dict[str, Any], kind: str, cfg, where: Path) -> None:
    """A mixture-of-experts directory loads into a model with its experts, top-k, renormalization and shared
    expert; a dense one into a dense model."""
    settings = _experts_of(config, kind)
    theirs = (settings["moe_experts"], settings.get("moe_top_k"))
    ours = (int(cfg.moe_experts), int(cfg.moe_top_k) if cfg.moe_experts else None)
    if theirs != ours:
        fix = f"model.moe_experts={theirs[0]}" + (f" model.moe_top_k={theirs[1]}" if theirs[0] else "")
        raise CheckpointError(f"{where} is model_type={kind} with {theirs[0]} experts"
                              f"{f' (top {theirs[1]})' if theirs[0] else ''} but model.moe_experts={ours[0]}"
                              f"{f' (model.moe_top_k={ours[1]})' if ours[0] else ''}; set {fix} to load it.")
    if not theirs[0]:
        return
    for key, hf_key in (("moe_norm_topk", "norm_topk_prob"), ("moe_shared_ffn_dim", "shared_expert_intermediate_size")):
        if settings[key] != type(settings[key])(getattr(cfg, key)):
            raise CheckpointError(f"{where} is model_type={kind} with {hf_key}={settings[key]} but model.{key}="
                                  f"{getattr(cfg, key)}; set model.{key}={settings[key]} to load it.")


def check_hf_config(config: Dict[str, Any], cfg, where: Path) -> None:
    """Refuse, in one line naming the key, what plait's decoder does not compute, and any setting of the
    directory that the model config does not share (rope_theta, rms_norm_eps), so no load is silently wrong."""
    def refuse(what: str) -> None:
        raise CheckpointError(f"{where}: {what}; plait's decoder cannot load it.")

    kind = config.get("model_type", "llama")
    if kind not in _ARCHITECTURES:
        refuse(f"model_type={kind} is not {', '.join(list(_ARCHITECTURES)[:-1])} or {list(_ARCHITECTURES)[-1]}")
    if kind == deepseek.KIND:
        deepseek.check_config(config, cfg, where)
    elif cfg.attention == "mla":
        raise CheckpointError(f"{where} is model_type={kind}, whose attention is multi-head, but model.attention=mla; "
                              "set model.attention=mha to load it.")
    _check_experts(config, kind, cfg, where)
    for key, has in _attention_of(config, kind).items():
        if has != bool(getattr(cfg, key)):
            raise CheckpointError(f"{where} is model_type={kind}, {'with' if has else 'without'} {_ADDS[key]}, "
                                  f"but model.{key}={bool(getattr(cfg, key))}; set model.{key}={has} to load it.")
    if kind in (*_QWEN, *_QWEN_MOE) and config.get("use_sliding_window"):
        refuse(f"use_sliding_window=true ({kind}'s per-layer windows)")
    if kind in _QWEN_MOE and (config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1):
        refuse(f"mlp_only_layers={config.get('mlp_only_layers')} and decoder_sparse_step="
               f"{config.get('decoder_sparse_step', 1)} give some layers a dense MLP (every plait block has experts)")
    theirs = config.get("sliding_window") if kind in _WINDOWED else None
    if theirs != cfg.sliding_window:
        raise CheckpointError(f"{where} has sliding_window={theirs} but model.sliding_window={cfg.sliding_window}; "
                              f"set model.sliding_window={'null' if theirs is None else theirs} to load it.")
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={config['hidden_act']} (plait's MLP is SwiGLU, silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            refuse(f"{key}=true (plait's linears have no bias)")
    rope = _rope(config)
    _check_rope_scaling(rope, cfg, where)
    heads = config.get("num_attention_heads")
    if config.get("head_dim") is not None and heads and config["head_dim"] != config["hidden_size"] // heads and \
            kind != deepseek.KIND:  # (DeepSeek-V3's head_dim is its rotary size)
        refuse(f"head_dim={config['head_dim']} is not hidden_size / num_attention_heads = "
               f"{config['hidden_size'] // heads} (plait's heads split the width)")
    for hf_key, key, theirs in (("rope_theta", "rope_theta", rope["theta"]),
                                ("rms_norm_eps", "norm_eps", float(config.get("rms_norm_eps", 1e-6)))):
        ours = float(getattr(cfg, key))
        if ours != theirs:
            raise CheckpointError(f"{where} has {hf_key}={theirs:g} but model.{key}={ours:g}; set model.{key}="
                                  f"{theirs:g} to load it.")


def model_config_from_hf(config: Dict[str, Any]):
    """The plait `ModelConfig` a Hugging Face config.json describes (Llama, Mistral, Qwen2, Qwen3, Mixtral,
    Qwen2-MoE, Qwen3-MoE); whether plait computes all of it is `init_from_hf`'s check."""
    from plait.train.config import ModelConfig

    kind, rope = config.get("model_type", "llama"), _rope(config)
    values = dict(vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                  n_heads=config["num_attention_heads"],
                  n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                  ffn_dim=_ffn_of(config, kind), max_seq_len=config.get("max_position_embeddings", 2048),
                  rope_theta=rope["theta"], norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                  sliding_window=config.get("sliding_window") if kind in _WINDOWED else None,
                  **_attention_of(config, kind), **_experts_of(config, kind),
                  **(deepseek.latent_of(config) if kind == deepseek.KIND else {}))
    if rope["type"] in _ROPE_KEYS:
        values.update(rope_scaling=rope["type"], **{key: rope[key] for key in _ROPE_KEYS[rope["type"]] if key in rope})
    return ModelConfig(**values)


def read_hf(directory: Path) -> (Dict[str, Any], Dict[str, torch.Tensor]):
    """(config.json, state dict) of an HF Llama directory, with clear errors for what is missing."""
    directory = Path(directory)
    for name in (HF_CONFIG, HF_WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is missing; point at a Hugging Face Llama directory "
                                  f"with {HF_CONFIG} and {HF_WEIGHTS}.")
    config = json.loads((directory / HF_CONFIG).read_text())
    return config, safetensors_load((directory / HF_WEIGHTS).read_bytes())


@torch.no_grad()
def init_from_hf(model, directory: Path, grid=None, write=None) -> None:
    """Copy an HF Llama directory's weights into a plait `Transformer` chunk (this rank's tp shards of `grid`;
    None: whole weights). `write(param, tensor)` stores a tp shard (default `param.copy_`; ZeRO-2/3 keeps
    this rank's rows of it)."""
    from plait.train.reshard import fit_rows
    from plait.train.config import ffn_dim, kv_heads

    config, hf = read_hf(directory)
    cfg = model.cfg
    ours = {"vocab_size": cfg.vocab_size, "dim": cfg.dim, "ffn_dim": ffn_dim(cfg), "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "n_kv_heads": kv_heads(cfg), "tie_embeddings": bool(cfg.tie_embeddings)}
    theirs = {key: config.get(hf_key, config.get("num_attention_heads") if hf_key == "num_key_value_heads" else None)
              for hf_key, key in _SHAPE_KEYS.items()}
    theirs["ffn_dim"] = _ffn_of(config, config.get("model_type", "llama"))
    theirs["tie_embeddings"] = bool(theirs["tie_embeddings"])
    wrong = [f"model.{key}={ours[key]} vs {theirs[key]}" for key in ours if ours[key] != theirs[key]]
    if wrong:
        raise CheckpointError(f"{Path(directory) / HF_CONFIG} does not fit this model: {', '.join(wrong)}; "
                              f"set the model config to match.")
    check_hf_config(config, cfg, Path(directory) / HF_CONFIG)
    scales = dataclasses.asdict(model.scales)
    recorded = {**ours, **{key: getattr(cfg, key) for key in _FROM_CFG}}
    full = from_hf(recorded, hf, scales)
    if config.get("model_type") == deepseek.KIND:
        deepseek.check_biases(hf, cfg, Path(directory) / HF_WEIGHTS)
        if config.get("rope_interleave", True):
            deepseek.halves_from_interleaved(full, recorded)
    specs = param_specs(model)
    rank, size = (grid.tp_rank, grid.tp) if grid is not None else (0, 1)
    mirrors = model.tied_copies()  # a last stage's tied head reads the embedding
    for name, param in model.named_parameters():
        if name.startswith("mtp."):
            continue  # the multi-token prediction depths, which no Hugging Face decoder holds, keep their init
        spec = specs[name]
        source = full[mirrors.get(name, name)].float()
        tensor = fit_rows(source, spec) if spec.valid_rows is not None else source
        (write or torch.Tensor.copy_)(param, spec.shard(tensor, rank, size))
    for name, bias in model.named_buffers():
        if name.endswith(deepseek.ROUTER_BIAS[0]):  # DeepSeek-V3's correction biases (replicated)
            bias.copy_(full[name])


def main(argv: Optional[List[str]] = None) -> int:
    """`plait export CKPT OUT [--dtype float32|bfloat16|float16]`."""
    parser = argparse.ArgumentParser(prog="plait export",
                                     description="Write a plait checkpoint (any layout) as one Hugging Face "
                                                 "Llama directory (config.json, model.safetensors).")
    parser.add_argument("checkpoint",
                        help="a checkpoint directory, a checkpoint root (its latest is used), or a run directory")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(Path(args.checkpoint), Path(args.out), getattr(torch, args.dtype))
    except CheckpointError as error:
        print(f"plait export: error: {error}", file=sys.stderr)
        return 2
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {args.checkpoint} to {out} ({files})")
    return 0
