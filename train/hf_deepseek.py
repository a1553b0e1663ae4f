"""DeepSeek-V3's Hugging Face format (`DeepseekV3ForCausalLM`), for `plait export` and `checkpoint.init_from`.

A plait decoder with `model.attention=mla` is DeepSeek-V3's with every block alike: all dense
(first_k_dense_replace = the layer count), or with `model.moe_experts` all mixtures routed as DeepSeek-V3 routes
(first_k_dense_replace 0): sigmoid scores, groups ranked by the sum of their two best scores, a correction bias
(`model.moe_bias_update_rate`'s) that picks experts but does not weigh them, the top-k weights renormalized
(`moe_norm_topk`) and scaled (`moe_topk_scaling_factor`), shared experts added ungated. Names, beside Llama's:

    layers.i.attn.wq | wq_a, q_a_norm, wq_b   -> model.layers.i.self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
    layers.i.attn.wkv_a, kv_a_norm, wkv_b     -> model.layers.i.self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
    layers.i.mlp.router, expert_bias          -> model.layers.i.mlp.gate.weight, mlp.gate.e_score_correction_bias
    layers.i.mlp.experts.e.w13, w2            -> model.layers.i.mlp.experts.e.{gate,up}_proj, down_proj
    layers.i.mlp.shared.w13, w2               -> model.layers.i.mlp.shared_experts.{gate,up}_proj, down_proj

plait turns the two halves of the rotary features against each other (`rotate_half`): exports say
rope_interleave=false. A directory with rope_interleave=true (DeepSeek's own layout, transformers' default) pairs
neighbouring features instead; its rotary rows are reordered on the way in, which is the same model.
"""

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch

from plait.train.config import LatentDims, latent_dims

KIND = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
ROUTER_BIAS = ("mlp.expert_bias", "mlp.gate.e_score_correction_bias")  # (plait's buffer, HF's)
SHARED = {"mlp.shared.w2.weight": "mlp.shared_experts.down_proj.weight"}
SHARED_FUSED = {"mlp.shared.w13.weight": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight")}


def dims_of(model: Dict[str, Any]) -> LatentDims:
    """The latent sizes of a recorded model config (defaults filled in)."""
    keys = ("dim", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    return latent_dims(SimpleNamespace(**{key: model.get(key) for key in keys}))


def attention_names(model: Dict[str, Any]) -> Dict[str, str]:
    """plait's latent attention weights -> HF's (the query path the model has)."""
    query = {"attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
             "attn.wq_b.weight": "self_attn.q_b_proj.weight"} if dims_of(model).q_rank else \
        {"attn.wq.weight": "self_attn.q_proj.weight"}
    return {**query, "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
            "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
            "attn.wkv_b.weight": "self_attn.kv_b_proj.weight"}


def refusal(model: Dict[str, Any]) -> Optional[str]:
    """Why a latent-attention model cannot be written as DeepSeek-V3, in one sentence; None when it can."""
    if model.get("sliding_window"):
        return (f"model.sliding_window={model['sliding_window']} has no place in DeepSeek-V3's config; export a "
                "model trained without it.")
    experts = int(model.get("moe_experts") or 0)
    if not experts:
        return None
    if model.get("moe_score_function", "softmax") != "sigmoid":
        return ("DeepSeek-V3 scores experts with a sigmoid but model.moe_score_function="
                f"{model.get('moe_score_function', 'softmax')}; train with model.moe_score_function=sigmoid.")
    shared = int(model.get("moe_shared_ffn_dim") or 0)
    if shared and (model.get("moe_shared_gate", True) or shared % int(model["ffn_dim"])):
        return (f"DeepSeek-V3's shared experts are ungated, each as wide as a routed expert, but model.moe_shared_gate="
                f"{model.get('moe_shared_gate', True)} and model.moe_shared_ffn_dim={shared} (ffn {model['ffn_dim']}); "
                "train with model.moe_shared_gate=false and a multiple of the expert width.")
    groups, top = int(model.get("moe_router_groups", 1)), int(model.get("moe_router_group_topk", 1))
    if groups > 1 and int(model["moe_top_k"]) // top != 2:
        return (f"DeepSeek-V3 ranks a group by its two best experts, but model.moe_top_k={model['moe_top_k']} over "
                f"model.moe_router_group_topk={top} groups ranks by {max(1, int(model['moe_top_k']) // top)}; train "
                "with moe_top_k = 2 x moe_router_group_topk.")
    if experts // groups < 2:
        return f"DeepSeek-V3 ranks a group by its two best experts, but model.moe_router_groups={groups} leaves one."
    return None


def config_keys(model: Dict[str, Any]) -> Dict[str, Any]:
    """config.json's DeepSeek-V3 keys of a plait model (beside the shape keys every family writes)."""
    dims, experts = dims_of(model), int(model.get("moe_experts") or 0)
    keys = {"q_lora_rank": dims.q_rank or None, "kv_lora_rank": dims.kv_rank, "qk_nope_head_dim": dims.nope,
            "qk_rope_head_dim": dims.rope, "v_head_dim": dims.v, "head_dim": dims.rope, "rope_interleave": False,
            "num_key_value_heads": model["n_heads"], "first_k_dense_replace": 0 if experts else model["n_layers"],
            "n_routed_experts": experts or 1, "moe_intermediate_size": model["ffn_dim"], "n_shared_experts": 0,
            "num_experts_per_tok": int(model.get("moe_top_k", 1)) if experts else 1, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": bool(model.get("moe_norm_topk", True)), "routed_scaling_factor": 1.0}
    if experts:
        shared = int(model.get("moe_shared_ffn_dim") or 0)
        keys.update(n_shared_experts=shared // int(model["ffn_dim"]), n_group=int(model.get("moe_router_groups", 1)),
                    topk_group=int(model.get("moe_router_group_topk", 1)),
                    routed_scaling_factor=float(model.get("moe_topk_scaling_factor", 1.0)))
    return keys


def experts_of(config: Dict[str, Any]) -> Dict[str, Any]:
    """The mixture-of-experts settings of a DeepSeek-V3 config.json by plait's names (none when every layer is
    dense). Its routers always hold a correction bias: the model keeps one (`moe_bias_update_rate` at DeepSeek-V3's
    1e-3, which only matters to further training)."""
    if int(config.get("first_k_dense_replace", 3)) >= int(config["num_hidden_layers"]):
        return {"moe_experts": 0}
    ffn = int(config.get("moe_intermediate_size", 2048))
    return {"moe_experts": int(config.get("n_routed_experts", 256)),
            "moe_top_k": int(config.get("num_experts_per_tok", 8)),
            "moe_norm_topk": bool(config.get("norm_topk_prob", True)), "moe_score_function": "sigmoid",
            "moe_shared_ffn_dim": int(config.get("n_shared_experts", 1)) * ffn, "moe_shared_gate": False,
            "moe_router_groups": int(config.get("n_group", 8)),
            "moe_router_group_topk": int(config.get("topk_group", 4)),
            "moe_topk_scaling_factor": float(config.get("routed_scaling_factor", 2.5)), "moe_bias_update_rate": 1e-3}


def latent_of(config: Dict[str, Any]) -> Dict[str, Any]:
    """The latent attention settings of a DeepSeek-V3 config.json by plait's names."""
    sizes = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}  # (its defaults)
    return {"attention": "mla", "q_lora_rank": int(config.get("q_lora_rank") or 0),
            **{key: int(config.get(key, default)) for key, default in sizes.items()}}


def check_config(config: Dict[str, Any], cfg, where: Path) -> None:
    """A DeepSeek-V3 directory loads into a latent-attention model of its sizes, its dense or mixture blocks all
    alike, routed as it routes."""
    from plait.train.reshard import CheckpointError

    if cfg.attention != "mla":
        raise CheckpointError(f"{where} is model_type={KIND}, whose attention is latent, but model.attention="
                              f"{cfg.attention}; set model.attention=mla and its sizes to load it.")
    dense_layers, layers = int(config.get("first_k_dense_replace", 3)), int(config["num_hidden_layers"])
    if 0 < dense_layers < layers:
        raise CheckpointError(f"{where} has first_k_dense_replace={dense_layers} of {layers} layers dense and the "
                              "rest mixtures; every plait block is one or the other, so plait cannot load it.")
    dims = latent_dims(cfg)
    ours = {"attention": "mla", "q_lora_rank": dims.q_rank, "kv_lora_rank": dims.kv_rank,
            "qk_nope_head_dim": dims.nope, "qk_rope_head_dim": dims.rope, "v_head_dim": dims.v, **_routing(cfg)}
    theirs = {**latent_of(config), **experts_of(config)}
    theirs.pop("moe_bias_update_rate", None)  # (a model without the bias loads zero biases: `check_biases`)
    wrong = [f"model.{key}={ours.get(key)} vs {value}" for key, value in theirs.items() if ours.get(key) != value]
    if wrong:
        raise CheckpointError(f"{where} does not fit this model: {', '.join(wrong)}; set the model config to match.")


def _routing(cfg) -> Dict[str, Any]:
    """The model config's mixture-of-experts settings that `experts_of` reads from a config.json."""
    if not cfg.moe_experts:
        return {"moe_experts": 0}
    keys = ("moe_experts", "moe_top_k", "moe_norm_topk", "moe_score_function", "moe_shared_ffn_dim",
            "moe_shared_gate", "moe_router_groups", "moe_router_group_topk", "moe_topk_scaling_factor")
    return {key: getattr(cfg, key) for key in keys}


def halves_from_interleaved(full: Dict[str, torch.Tensor], model: Dict[str, Any]) -> None:
    """Reorder the rotary rows of each query and shared-key projection of a rope_interleave=true directory (new
    tensors in `full`): features (0, 1), (2, 3), ... turn together there, (0, r/2), (1, r/2 + 1), ... in plait."""
    dims = dims_of(model)
    order = torch.cat((torch.arange(0, dims.rope, 2), torch.arange(1, dims.rope, 2)))
    for name, tensor in list(full.items()):
        if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
            heads = tensor.reshape(model["n_heads"], dims.qk, -1)
            full[name] = torch.cat((heads[:, :dims.nope], heads[:, dims.nope:][:, order]), dim=1).reshape(tensor.shape)
        elif name.endswith("attn.wkv_a.weight"):
            full[name] = torch.cat((tensor[:dims.kv_rank], tensor[dims.kv_rank:][order]))


def zero_biases(model: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A zero correction bias for each mixture's router: a model trained without `model.moe_bias_update_rate`."""
    return {f"model.layers.{i}.{ROUTER_BIAS[1]}": torch.zeros(int(model["moe_experts"]))
            for i in range(int(model["n_layers"]))}


def check_biases(hf: Dict[str, torch.Tensor], cfg, where: Path) -> None:
    """A directory whose routers carry a correction bias loads into a model that keeps one (it picks the experts)."""
    from plait.train.reshard import CheckpointError

    biased = any(name.endswith(ROUTER_BIAS[1]) and bool(tensor.any()) for name, tensor in hf.items())
    if biased and not cfg.moe_bias_update_rate:
        raise CheckpointError(f"{where}'s routers carry correction biases (e_score_correction_bias), which pick "
                              "experts, but model.moe_bias_update_rate=0 keeps none; set it above 0 (DeepSeek-V3: "
                              "1e-3) to load them.")
