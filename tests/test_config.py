"""The typed config: composition, overrides, rejection of wrong types and unknown keys, relations."""

import pytest

from plait.train.config import ConfigError, ffn_dim, load_config, validate


def test_defaults_compose_and_validate():
    cfg = load_config()
    assert cfg.model.name == "tiny" and cfg.optim.name == "adamw" and cfg.parallel.tp == 1
    assert validate(cfg, world_size=1) == 1


def test_overrides_and_groups():
    cfg = load_config(["model=small", "optim=lion", "optim.lr=3e-4", "train.steps=50"])
    assert (cfg.model.dim, cfg.optim.name, cfg.optim.lr, cfg.train.steps) == (512, "lion", 3e-4, 50)


def test_experiment_group_overrides_across_groups():
    cfg = load_config(["experiment=tiny_tp2"])
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel


@pytest.mark.parametrize("override", ["optim.lr=abc", "model.n_layers=1.5", "model.unknown_key=1",
                                      "train.nope=2"])
def test_schema_rejects_bad_types_and_unknown_keys(override):
    with pytest.raises(Exception) as info:
        load_config([override])
    assert override.split("=")[0].split(".")[-1] in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("overrides, world, fragment", [
    (["model.n_heads=7"], 1, "model.n_heads=7 does not divide model.dim=256"),
    (["parallel.tp=3"], 3, "parallel.tp=3 does not divide model.n_heads=8"),
    (["train.batch_size=10", "parallel.microbatches=4"], 1, "train.batch_size=10 is not divisible"),
    (["parallel.tp=2"], 3, "world size 3 is not a multiple of parallel.tp x parallel.pp = 2"),
    (["parallel.dp=4"], 2, "parallel.dp=4 but world size 2"),
    (["model.n_kv_heads=3"], 1, "model.n_kv_heads=3 does not divide model.n_heads=8"),
    (["data.path=/no/such/dir"], 1, "data.path=/no/such/dir does not exist"),
    (["model.moe_experts=4", "model.moe_top_k=5"], 1,
     "model.moe_top_k=5 must be >= 1 and <= 4; route each token to 1 to model.moe_experts=4 experts"),
    (["model.moe_experts=-2"], 1, "model.moe_experts=-2 must be >= 0; 0 keeps a dense MLP"),
    (["model.moe_experts=4", "model.moe_aux_loss=-1"], 1,
     "model.moe_aux_loss=-1.0 must be >= 0; 0 turns the balancing loss off"),
    (["model.moe_experts=4", "model.ffn_dim=100", "parallel.tp=8"], 8,
     "parallel.tp=8 does not divide the MLP width 100"),
    (["model.moe_experts=4", "parallel.ep=3"], 4,
     "parallel.ep=3 does not divide the data-parallel degree dp=4 (experts are split over ep of the dp ranks)"),
    (["parallel.ep=2"], 2,
     "parallel.ep=2 splits a mixture of experts, but model.moe_experts=0; set model.moe_experts to a multiple of 2 "
     "or parallel.ep=1."),
    (["model.moe_experts=6", "parallel.ep=4"], 4, "parallel.ep=4 does not divide model.moe_experts=6"),
    (["model.moe_shared_ffn_dim=64"], 1, "model.moe_shared_ffn_dim=64 sets up a mixture of experts, but "
     "model.moe_experts=0; set model.moe_experts or model.moe_shared_ffn_dim=0."),
    (["model.moe_experts=4", "model.moe_z_loss=-0.1"], 1, "model.moe_z_loss=-0.1 must be >= 0; 0 turns the router "
     "z-loss off"),
    (["model.moe_experts=4", "model.moe_shared_ffn_dim=100", "parallel.tp=8"], 8,
     "parallel.tp=8 does not divide the shared expert's width model.moe_shared_ffn_dim=100; set it to a multiple of "
     "tp."),
    (["model.moe_experts=4", "model.moe_capacity_factor=0"], 1,
     "model.moe_capacity_factor=0.0 must be > 0; null keeps every token (dropless)"),
    (["model.moe_capacity_factor=1.25"], 1, "model.moe_capacity_factor=1.25 sets up a mixture of experts, but "
     "model.moe_experts=0; set model.moe_experts or model.moe_capacity_factor=null."),
    (["model.moe_experts=4", "model.moe_drop_policy=random"], 1, "model.moe_drop_policy=random"),
    (["model.moe_experts=4", "model.moe_bias_update_rate=-0.001"], 1,
     "model.moe_bias_update_rate=-0.001 must be >= 0; 0 turns the routing bias off"),
    (["model.moe_bias_update_rate=0.001"], 1, "model.moe_bias_update_rate=0.001 sets up a mixture of experts"),
    (["model.moe_experts=4", "model.moe_aux_loss_type=seq_aux_loss", "parallel.cp=2"], 2,
     "model.moe_aux_loss_type=seq_aux_loss balances each sequence, which parallel.cp=2 splits over ranks"),
    (["model.moe_score_function=sigmoid"], 1, "model.moe_score_function=sigmoid sets up a mixture of experts"),
    (["model.moe_experts=4", "model.moe_score_function=relu"], 1, "model.moe_score_function=relu is not one of"),
    (["model.moe_experts=4", "model.moe_topk_scaling_factor=0"], 1,
     "model.moe_topk_scaling_factor=0.0 must be > 0; 1 keeps the router's weights"),
    (["model.moe_experts=4", "model.moe_shared_gate=false"], 1,
     "model.moe_shared_gate=false leaves the gate off a shared expert there is not"),
    (["model.moe_experts=6", "model.moe_router_groups=4"], 1, "model.moe_router_groups=4 does not divide "
     "model.moe_experts=6; pick a group count that splits the experts evenly."),
    (["model.moe_experts=8", "model.moe_router_groups=4", "model.moe_router_group_topk=5"], 1,
     "model.moe_router_group_topk=5 must be"),
    (["model.moe_experts=8", "model.moe_top_k=4", "model.moe_router_groups=4", "model.moe_router_group_topk=1"], 1,
     "model.moe_top_k=4 is more experts than the model.moe_router_group_topk=1 groups a token may use hold (2)"),
    (["model.moe_router_groups=2"], 1, "model.moe_router_groups=2 sets up a mixture of experts"),
])
def test_relations_give_one_sentence(overrides, world, fragment):
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides), world_size=world)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_swiglu_width_rounds_to_multiple():
    cfg = load_config()
    assert ffn_dim(cfg.model) == 704  # 8/3 * 256 = 682.7 rounded up to a multiple of 32
