"""The model on its own: config validation, presets and sizes, MoE routing and balancing, MTP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HF_BASE

import minir1.models.deepseek_v3 as model_mod
from minir1 import ConfigError, ModelConfig, ModelOutput, Transformer
from minir1.models.deepseek_v3 import MoE, Router


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok (9) must be <= n_routed_experts (8)"),
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts (10) must be divisible by n_group (4)"),
    (dict(topk_group=3, n_group=2), "topk_group (3) must be between 1 and n_group (2)"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim (7) must be even"),
    (dict(hidden_size=0), "hidden_size (0) must be a positive integer"),
    (dict(q_lora_rank=0), "q_lora_rank (0) must be a positive integer or null"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling.type ('linear') is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling.original_max_position_embeddings"),
    (dict(eos_token_id=5000), "eos_token_id (5000) must be null or an id in [0, vocab_size=1024)"),
])
def test_config_validation_names_field_and_rule(overrides, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", **overrides)
    assert message in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.from_preset("huge")


def test_published_shapes_on_meta_device():
    with torch.device("meta"):
        v3 = Transformer(ModelConfig.from_preset("deepseek-v3"))
        lite = Transformer(ModelConfig.from_preset("deepseek-v2-lite"))
    n = v3.num_parameters()
    assert 670.5e9 < n["total"] < 671.5e9          # "671B total"
    assert 37.0e9 < n["activated"] < 38.0e9        # "37B activated"
    assert 11e9 < n["mtp"] < 12e9                  # + shared embedding and head = the 14B MTP module
    assert 15.5e9 < lite.num_parameters()["total"] < 16e9
    assert ModelConfig.from_preset("deepseek-v3").kv_cache_bytes_per_token(2)["mla_latent"] == 70_272


@pytest.mark.parametrize("preset, low, high", [("tiny", 1e6, 2e6), ("small", 10e6, 20e6)])
def test_small_presets_sizes(preset, low, high):
    with torch.device("meta"):
        assert low <= Transformer(ModelConfig.from_preset(preset)).num_parameters()["total"] <= high


def test_forward_outputs_from_one_pass():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", num_nextn_predict_layers=2, aux_loss_alpha=0.01)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    logits = model(ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 24, cfg.vocab_size)
    out = model(ids, mtp=True)
    assert isinstance(out, ModelOutput)
    torch.testing.assert_close(out.logits, logits)
    assert [t.shape for t in out.mtp_logits] == [(2, 23, cfg.vocab_size), (2, 22, cfg.vocab_size)]
    n_moe = len(model.moe_layers())
    assert n_moe == cfg.num_hidden_layers - cfg.first_k_dense_replace + 2  # MTP blocks are MoE too
    # Every token picks num_experts_per_tok experts in each MoE layer of the main model.
    main_moe = n_moe - 2
    assert out.router_load[:main_moe].sum(-1).tolist() == [2 * 24 * cfg.num_experts_per_tok] * main_moe
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
    loss = loss + sum(F.cross_entropy(m.flatten(0, 1), ids[:, k + 1:].flatten())
                      for k, m in enumerate(out.mtp_logits))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def perturbed_outputs(fn, length: int, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(model, ids) on random ids and on the same ids with the token at `at` changed."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 1024, (1, length))
    ids2 = ids.clone()
    ids2[0, at] = (ids[0, at] + 7) % 1024
    with torch.no_grad():
        return fn(model, ids), fn(model, ids2)


def test_mtp_depth_uses_the_next_token_embedding():
    """MTP depth 1 at position i must see token i+1 (and nothing later): changing token j only changes
    MTP logits at positions >= j-1."""
    a, b = perturbed_outputs(lambda m, ids: m(ids, mtp=True).mtp_logits[0], length=16, at=10)
    diff = (a - b).abs().amax(-1)[0]
    assert torch.all(diff[:9] < 1e-5) and diff[9] > 1e-3


def test_router_selects_exactly_the_reference_experts():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    for n_group, topk_group in [(1, 1), (4, 2), (4, 1)]:
        hf_cfg = DeepseekV3Config(**{**HF_BASE, "n_group": n_group, "topk_group": topk_group})
        base = {k: v for k, v in HF_BASE.items() if k != "num_key_value_heads"}
        cfg = ModelConfig(**{**base, "n_group": n_group, "topk_group": topk_group})
        torch.manual_seed(n_group * 10 + topk_group)
        ref, ours = DeepseekV3TopkRouter(hf_cfg), Router(cfg)
        with torch.no_grad():
            ref.weight.normal_(0, 0.3)
            ref.e_score_correction_bias.normal_(0, 0.2)
            ours.weight.copy_(ref.weight)
            ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
        x = torch.randn(2048, cfg.hidden_size)
        _, ref_w, ref_ids = ref(x)
        w, ids, _ = ours(x)
        ref_ids, order_r = ref_ids.sort(-1)
        ids, order_o = ids.sort(-1)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w.gather(1, order_o), ref_w.gather(1, order_r))
        if topk_group < n_group:  # group limit: all chosen experts lie in <= topk_group groups
            groups = ids // (cfg.n_routed_experts // n_group)
            assert max(len(set(g.tolist())) for g in groups) <= topk_group


def test_bias_steers_selection_not_weights():
    torch.manual_seed(0)
    router = Router(ModelConfig.from_preset("tiny"))
    torch.nn.init.normal_(router.weight, 0, 0.1)
    x = torch.randn(64, 128)
    w0, ids0, scores = router(x)
    router.e_score_correction_bias[3] = 10.0  # expert 3 now always chosen
    w1, ids1, _ = router(x)
    assert (ids1 == 3).any(-1).all() and not (ids0 == 3).any(-1).all()
    # Weights still come from the unbiased affinities.
    raw = scores.gather(1, ids1)
    torch.testing.assert_close(w1, raw / raw.sum(-1, keepdim=True) * router.scaling)


def test_balancing_updates_equalise_a_skewed_router():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", first_k_dense_replace=2, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    moe = model.moe_layers()[0]
    direction = F.normalize(torch.randn(cfg.hidden_size), dim=0)
    with torch.no_grad():  # affinity to a shared input direction that decreases with the expert index
        skew = torch.linspace(1, -1, cfg.n_routed_experts)[:, None] * direction
        moe.gate.weight.copy_(torch.randn(cfg.n_routed_experts, cfg.hidden_size) * 0.1 + skew)

    def batch() -> torch.Tensor:
        return torch.randn(8, 128, cfg.hidden_size) + direction * 2

    def ratio() -> float:
        with torch.no_grad():
            moe(batch())
        load = moe.last_load
        moe.load_since_update.zero_()
        return (load.max() / load.mean()).item()

    before = ratio()
    for _ in range(300):
        with torch.no_grad():
            moe(batch())
        model.update_route_bias(0.01)
    after = sum(ratio() for _ in range(5)) / 5
    assert before > 2.5
    assert after < 1.2


def test_grouped_and_looped_expert_dispatch_agree(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(2, 32, cfg.hidden_size, requires_grad=True)
    y1 = moe(x)
    g1 = torch.autograd.grad(y1.sum(), [x, moe.experts.gate_up_proj])
    monkeypatch.setattr(model_mod, "_GROUPED_MM", False)
    y2 = moe(x)
    g2 = torch.autograd.grad(y2.sum(), [x, moe.experts.gate_up_proj])
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tokens", [16, 100])
def test_moe_matches_a_dense_per_token_reference(tokens):
    """Both expert paths against every token through its experts one at a time: 16 tokens without
    gradients take the all-experts decode path, 100 the sorted dispatch."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    moe = MoE(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(1, tokens, cfg.hidden_size)
    with torch.no_grad():
        assert moe._dense_is_cheaper(tokens) == (tokens <= model_mod.DENSE_MOE_MAX_TOKENS)
        y = moe(x)[0]
        w, ids, _ = moe.gate(x[0])
        for t in range(tokens):
            ref = moe.shared_experts(x[0, t])
            for k in range(cfg.num_experts_per_tok):
                e = ids[t, k]
                g, u = (moe.experts.gate_up_proj[e] @ x[0, t]).chunk(2)
                ref = ref + w[t, k] * (moe.experts.down_proj[e] @ (F.silu(g) * u))
            torch.testing.assert_close(y[t], ref, atol=1e-5, rtol=1e-5)
    assert not moe._dense_is_cheaper(16), "with gradients (training) the dispatch path is always taken"


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).train()
    ids = torch.randint(0, 1024, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss) and model.embed_tokens.weight.grad is not None


def test_causality():
    a, b = perturbed_outputs(lambda m, ids: m(ids), length=20, at=15)
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_loss_drops_when_training():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 1024, (4, 33))
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_route_bias(1e-3)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_compile_path_grouped_op_has_the_same_gradients():
    """The opaque op that torch.compile sees (forward and registered backward) matches eager autograd."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 6, requires_grad=True)
    w = torch.randn(4, 7, 6, requires_grad=True)
    y = model_mod._grouped_linear_op(x, w, counts)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, w], g)
    ref = torch.cat([F.linear(c, w[e]) for e, c in enumerate(x.split(counts.tolist())) if len(c)])
    rx, rw = torch.autograd.grad(ref, [x, w], g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
