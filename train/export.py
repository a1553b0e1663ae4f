"""Hugging Face Llama format: `plait export CKPT OUT`, and initializing a model from such a directory.

Export reassembles every parameter in full from the checkpoint's tp shards (any layout),
cuts the vocabulary padding, renames to `LlamaForCausalLM`'s names (`MistralForCausalLM` for a model with
`model.sliding_window`: the same names, and its window in config.json; `Qwen3ForCausalLM` for a model with
`model.qk_norm`: the same names plus each attention's q_norm and k_norm; `Qwen2ForCausalLM` with
`model.qkv_bias`: plus q, k and v biases) and writes
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
would undo a scaled q_proj). Import undoes the same folding.
"""

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load as safetensors_load

from plait.common.paths import unwritable_reason
from plait.parallel.plans import param_specs
from plait.train.reshard import CheckpointError, load_full_model
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


def _layer_tables(model: Dict[str, Any]):
    """(one-to-one names, fused names -> their segments' names) of a layer: q/k/v biases where the model has them,
    and the dense MLP's, or a mixture of experts' as Mixtral's checkpoints name them (router -> gate, each
    expert's gate|up -> w1, w3, down -> w2)."""
    experts = int(model.get("moe_experts") or 0)
    attention = {**_FUSED, **(_FUSED_BIAS if model.get("qkv_bias") else {})}
    if not experts:
        return {**_SIMPLE, **_DENSE_MLP}, {**attention, **_DENSE_FUSED}
    simple, fused = {**_SIMPLE, "mlp.router.weight": f"{MIXTRAL_MOE}.gate.weight"}, attention
    for e in range(experts):
        ours, theirs = f"mlp.experts.{e}.", f"{MIXTRAL_MOE}.experts.{e}."
        simple[ours + "w2.weight"] = theirs + "w2.weight"
        fused[ours + "w13.weight"] = (theirs + "w1.weight", theirs + "w3.weight")
    return simple, fused


# model_type -> (the plait model setting that makes a model of it, its architecture, what the setting adds)
_QWEN = {"qwen3": ("qk_norm", "Qwen3ForCausalLM", "QK-norm"),
         "qwen2": ("qkv_bias", "Qwen2ForCausalLM", "q, k and v biases")}


def hf_config(model: Dict[str, Any]) -> Dict[str, Any]:
    """`config.json` of a `LlamaForCausalLM` with plait's model shape (older and newer rope keys both); with a
    sliding window, of a `MistralForCausalLM` (the same weights and names, plus `sliding_window`); with QK-norm,
    of a `Qwen3ForCausalLM` (plus q_norm and k_norm); with q, k and v biases, of a `Qwen2ForCausalLM`; with experts,
    of a `MixtralForCausalLM` (its window too, if any)."""
    head_dim = model["dim"] // model["n_heads"]
    window = model.get("sliding_window")
    features = [key for key in [*(key for key, _, _ in _QWEN.values()), "moe_experts", "sliding_window"]
                if model.get(key)]
    if len(features) > 1 and set(features) != {"moe_experts", "sliding_window"}:
        raise CheckpointError(f"a model with {' and '.join('model.' + key for key in features)} has no Hugging Face "
                              f"architecture plait writes (Qwen3: qk_norm, Qwen2: qkv_bias, Mistral: sliding_window, "
                              f"Mixtral: moe_experts with or without sliding_window); export a model with one of them.")
    family = next((kind for kind, (key, _, _) in _QWEN.items() if model.get(key)), None)
    if model.get("moe_experts"):
        architecture = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "sliding_window": window,
                        "num_local_experts": model["moe_experts"], "num_experts_per_tok": model["moe_top_k"],
                        "router_aux_loss_coef": model["moe_aux_loss"], "router_jitter_noise": 0.0,
                        "output_router_logits": False}
    elif family is not None:
        architecture = {"architectures": [_QWEN[family][1]], "model_type": family, "use_sliding_window": False,
                        "sliding_window": None, "max_window_layers": model["n_layers"]}
    elif window is not None:
        architecture = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}
    else:
        architecture = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {
        **architecture,
        "vocab_size": model["vocab_size"], "hidden_size": model["dim"], "intermediate_size": model["ffn_dim"],
        "num_hidden_layers": model["n_layers"], "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"], "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": model["max_seq_len"], "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"], **_rope_keys(model),
        "tie_word_embeddings": bool(model["tie_embeddings"]), "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": model.get("init_std", 0.02), "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32", "dtype": "float32",
    }


# plait's llama3 rope settings -> Hugging Face's rope parameter names
_LLAMA3_KEYS = {"rope_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
                "rope_high_freq_factor": "high_freq_factor",
                "rope_original_max_len": "original_max_position_embeddings"}


def _rope_keys(model: Dict[str, Any]) -> Dict[str, Any]:
    """`rope_parameters` (newer transformers) and, for Llama 3.1's scaling, `rope_scaling` (older ones)."""
    if model.get("rope_scaling") != "llama3":
        return {"rope_parameters": {"rope_type": "default", "rope_theta": model["rope_theta"]}}
    scaling = {"rope_type": "llama3", **{hf: model[ours] for ours, hf in _LLAMA3_KEYS.items()}}
    return {"rope_parameters": {**scaling, "rope_theta": model["rope_theta"]}, "rope_scaling": scaling}


def _segments(model: Dict[str, Any], fused: str) -> List[int]:
    head_dim = model["dim"] // model["n_heads"]
    if fused.startswith("attn.wqkv."):
        return [model["n_heads"] * head_dim, model["n_kv_heads"] * head_dim, model["n_kv_heads"] * head_dim]
    return [model["ffn_dim"], model["ffn_dim"]]


def _fold_factors(model: Dict[str, Any], scales: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """Multipliers that move plait's muP scales into the weights HF Llama has."""
    scales = scales or {}
    embedding = float(scales.get("embedding", 1.0))
    logits = float(scales.get("logits", 1.0))
    head_dim = model["dim"] // model["n_heads"]
    attention = scales.get("attention")
    query = 1.0 if attention is None else float(attention) * math.sqrt(head_dim)
    norm = logits / embedding if model["tie_embeddings"] else logits
    # what takes the query scale: q_norm's gain (it would undo a scaled q_proj), else q_proj and its bias
    query_into = ("attn.q_norm.weight",) if model.get("qk_norm") else ("attn.wqkv.weight", "attn.wqkv.bias")
    return {"embed": embedding, "norm": norm, "query": query, "query_into": query_into}


def to_hf(model: Dict[str, Any], full: Dict[str, torch.Tensor],
          scales: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """plait's full tensors (vocabulary padding cut) as HF Llama's state dict."""
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
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            prefix = f"model.layers.{index}."
            if rest in simple:
                out[prefix + simple[rest]] = tensor
            elif rest in _QK_NORMS:
                query = fold["query"] if rest in fold["query_into"] else 1.0
                out[prefix + _QK_NORMS[rest]] = tensor * query if query != 1.0 else tensor
            elif rest in fused:
                parts = list(tensor.split(_segments(model, rest), dim=0))
                if rest in fold["query_into"] and fold["query"] != 1.0:  # the first segment is the query's
                    parts[0] = parts[0] * fold["query"]
                out.update({prefix + hf_name: part for part, hf_name in zip(parts, fused[rest])})
            else:
                raise CheckpointError(f"parameter {name} has no Hugging Face Llama counterpart.")
        else:
            raise CheckpointError(f"parameter {name} has no Hugging Face Llama counterpart.")
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
            full[f"layers.{index}.{rest}"] = hf[prefix + hf_name]
        for rest, hf_name in (_QK_NORMS.items() if model.get("qk_norm") else ()):
            query = fold["query"] if rest in fold["query_into"] else 1.0
            full[f"layers.{index}.{rest}"] = hf[prefix + hf_name] / query if query != 1.0 else hf[prefix + hf_name]
        for rest, hf_names in fused.items():
            parts = [hf[prefix + hf_name] for hf_name in hf_names]
            if rest in fold["query_into"] and fold["query"] != 1.0:
                parts[0] = parts[0] / fold["query"]
            full[f"layers.{index}.{rest}"] = torch.cat(parts, dim=0)
    return full


def export_checkpoint(checkpoint: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `checkpoint` (any layout) as one HF Llama directory `out`; returns `out`.

    A new `out` appears whole or not at all (written under a temporary name, then renamed).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint} does not exist; pass a checkpoint directory (with index.json) or a "
                              f"checkpoint root (with latest), e.g. <run_dir>/checkpoints.")
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
    numbers = {ours: scaling[hf] for ours, hf in _LLAMA3_KEYS.items() if hf in scaling}
    return {"theta": float(params.get("rope_theta", config.get("rope_theta", 10000.0))), "type": kind, **numbers}


def _check_rope_scaling(rope: Dict[str, Any], cfg, where: Path) -> None:
    """A Llama 3.1 directory loads into a model with the same llama3 numbers; an unscaled one into an unscaled model."""
    theirs = None if rope["type"] in (None, "default") else rope["type"]
    if theirs not in (None, "llama3"):
        raise CheckpointError(f"{where}: rope_scaling type {theirs} (plait computes llama3 scaling or none); "
                              f"plait's decoder cannot load it.")
    ours = cfg.rope_scaling
    wanted = {key: rope[key] for key in _LLAMA3_KEYS if key in rope} if theirs else {}
    if theirs != ours or any(float(getattr(cfg, key)) != float(value) for key, value in wanted.items()):
        numbers = "".join(f", {hf}={rope[key]:g}" for key, hf in _LLAMA3_KEYS.items() if key in wanted)
        settings = " ".join([f"model.rope_scaling={theirs or 'null'}"]
                            + [f"model.{key}={value:g}" for key, value in wanted.items()])
        raise CheckpointError(f"{where} has rope_scaling={theirs or 'null'}{numbers} but model.rope_scaling="
                              f"{ours or 'null'}; set {settings} to load it.")


_WINDOWED = ("mistral", "mixtral")  # the model types whose config.json's sliding_window plait reads


def _experts_of(config: Dict[str, Any]) -> Tuple[int, int]:
    """(experts, top-k) of a Mixtral config.json (transformers' defaults where a key is absent)."""
    return int(config.get("num_local_experts", 8)), int(config.get("num_experts_per_tok", 2))


def _check_experts(config: Dict[str, Any], kind: str, cfg, where: Path) -> None:
    """A Mixtral directory loads into a model with its experts and top-k; any other into a dense model."""
    theirs = _experts_of(config) if kind == "mixtral" else (0, None)
    ours = (int(cfg.moe_experts), int(cfg.moe_top_k) if cfg.moe_experts else None)
    if theirs != ours:
        settings = f"model.moe_experts={theirs[0]}" + (f" model.moe_top_k={theirs[1]}" if theirs[0] else "")
        raise CheckpointError(f"{where} is model_type={kind} with {theirs[0]} experts"
                              f"{f' (top {theirs[1]})' if theirs[0] else ''} but model.moe_experts={ours[0]}"
                              f"{f' (model.moe_top_k={ours[1]})' if ours[0] else ''}; set {settings} to load it.")


def check_hf_config(config: Dict[str, Any], cfg, where: Path) -> None:
    """Refuse, in one line naming the key, what plait's decoder does not compute, and any setting of the
    directory that the model config does not share (rope_theta, rms_norm_eps), so no load is silently wrong."""
    def refuse(what: str) -> None:
        raise CheckpointError(f"{where}: {what}; plait's decoder cannot load it.")

    kind = config.get("model_type", "llama")
    if kind not in ("llama", "mistral", "mixtral", *_QWEN):
        refuse(f"model_type={kind} is not llama, mistral, mixtral, qwen2 or qwen3")
    _check_experts(config, kind, cfg, where)
    for family, (key, _, what) in _QWEN.items():
        if (kind == family) != bool(getattr(cfg, key)):
            raise CheckpointError(f"{where} is model_type={kind}, {'with' if kind == family else 'without'} {what}, "
                                  f"but model.{key}={bool(getattr(cfg, key))}; set model.{key}={kind == family} to "
                                  f"load it.")
    if kind in _QWEN and config.get("use_sliding_window"):
        refuse(f"use_sliding_window=true ({kind}'s per-layer windows)")
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
    if config.get("head_dim") is not None and heads and config["head_dim"] != config["hidden_size"] // heads:
        refuse(f"head_dim={config['head_dim']} is not hidden_size / num_attention_heads = "
               f"{config['hidden_size'] // heads} (plait's heads split the width)")
    for hf_key, key, theirs in (("rope_theta", "rope_theta", rope["theta"]),
                                ("rms_norm_eps", "norm_eps", float(config.get("rms_norm_eps", 1e-6)))):
        ours = float(getattr(cfg, key))
        if ours != theirs:
            raise CheckpointError(f"{where} has {hf_key}={theirs:g} but model.{key}={ours:g}; set model.{key}="
                                  f"{theirs:g} to load it.")


def model_config_from_hf(config: Dict[str, Any]):
    """The plait `ModelConfig` a Hugging Face config.json describes (Llama, Mistral, Qwen2, Qwen3); whether plait
    computes all of it is `init_from_hf`'s check."""
    from plait.train.config import ModelConfig

    kind, rope = config.get("model_type", "llama"), _rope(config)
    values = dict(vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                  n_heads=config["num_attention_heads"],
                  n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                  ffn_dim=config["intermediate_size"], max_seq_len=config.get("max_position_embeddings", 2048),
                  rope_theta=rope["theta"], norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                  sliding_window=config.get("sliding_window") if kind in _WINDOWED else None,
                  **{key: kind == family for family, (key, _, _) in _QWEN.items()})
    if kind == "mixtral":
        experts, top_k = _experts_of(config)
        values.update(moe_experts=experts, moe_top_k=top_k,
                      moe_aux_loss=float(config.get("router_aux_loss_coef", 0.01)))
    if rope["type"] == "llama3":
        values.update(rope_scaling="llama3", **{key: rope[key] for key in _LLAMA3_KEYS if key in rope})
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
    theirs["tie_embeddings"] = bool(theirs["tie_embeddings"])
    wrong = [f"model.{key}={ours[key]} vs {theirs[key]}" for key in ours if ours[key] != theirs[key]]
    if wrong:
        raise CheckpointError(f"{Path(directory) / HF_CONFIG} does not fit this model: {', '.join(wrong)}; "
                              f"set the model config to match.")
    check_hf_config(config, cfg, Path(directory) / HF_CONFIG)
    scales = {"embedding": model.scales.embedding, "logits": model.scales.logits, "attention": model.scales.attention}
    full = from_hf({**ours, "max_seq_len": cfg.max_seq_len, "moe_experts": cfg.moe_experts,
                    **{key: bool(getattr(cfg, key)) for key, _, _ in _QWEN.values()}}, hf, scales)
    specs = param_specs(model)
    rank, size = (grid.tp_rank, grid.tp) if grid is not None else (0, 1)
    mirrors = model.tied_copies()  # a last stage's tied head reads the embedding
    for name, param in model.named_parameters():
        spec = specs[name]
        source = full[mirrors.get(name, name)].float()
        tensor = fit_rows(source, spec) if spec.valid_rows is not None else source
        (write or torch.Tensor.copy_)(param, spec.shard(tensor, rank, size))


def main(argv: Optional[List[str]] = None) -> int:
    """`plait export CKPT OUT [--dtype float32|bfloat16|float16]`."""
    parser = argparse.ArgumentParser(prog="plait export",
                                     description="Write a plait checkpoint (any layout) as one Hugging Face "
                                                 "Llama directory (config.json, model.safetensors).")
    parser.add_argument("checkpoint", help="a checkpoint directory, or a checkpoint root (its latest is used)")
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
