"""Every balance and routing policy of the eager module against a formula written out here by hand
(loops over tokens and experts, the papers' definitions), on tiny cases in float64."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moe_ir.backends.torch_eager import MoELayer
from moe_ir.maxvio import MaxVioTracker, main as maxvio_main, maxvio
from moe_ir.spec import spec_from_dict

H, E, K, B, S = 6, 4, 2, 2, 5
T = B * S


def layer(balance=None, router=None, experts=None, capacity=None, seed=0):
    data = {"hidden": H, "experts": {"routed": E, "width": 3, "top_k": K, **(experts or {})},
            "balance": balance or {}, "router": router or {}, "capacity": capacity or {}}
    return MoELayer.from_spec(spec_from_dict(data), seed=seed).double()


def inputs(seed=0):
    return torch.randn(B, S, H, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def hand_scores(logits):
    rows = []
    for t in range(logits.shape[0]):
        z = [math.exp(v) for v in logits[t].tolist()]
        rows.append([v / sum(z) for v in z])
    return rows


def hand_topk(row, k):
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def run(module, x):
    res = module(x)
    logits = res.routing["router_logits"].detach()
    return res, logits, hand_scores(logits)


def test_switch_loss():
    res, logits, s = run(layer({"switch": 0.01}), inputs())
    f = [sum(1 for t in range(T) if hand_topk(s[t], 1)[0] == i) / T for i in range(E)]
    p = [sum(s[t][i] for t in range(T)) / T for i in range(E)]
    expected = 0.01 * E * sum(f[i] * p[i] for i in range(E))
    assert res.losses["switch"].item() == pytest.approx(expected, rel=1e-12)


def test_expert_level_loss_uses_n_prime_over_k_prime_t():
    res, logits, s = run(layer({"expert": 0.01}), inputs(1))
    f = [E / (K * T) * sum(1 for t in range(T) if i in hand_topk(s[t], K)) for i in range(E)]
    p = [sum(s[t][i] for t in range(T)) / T for i in range(E)]
    assert res.losses["expert"].item() == pytest.approx(0.01 * sum(f[i] * p[i] for i in range(E)), rel=1e-12)


def test_device_level_loss():
    devices = 2
    res, logits, s = run(layer({"device": {"alpha": 0.05, "devices": devices}}), inputs(2))
    f = [E / (K * T) * sum(1 for t in range(T) if i in hand_topk(s[t], K)) for i in range(E)]
    p = [sum(s[t][i] for t in range(T)) / T for i in range(E)]
    per = E // devices
    groups = [range(d * per, (d + 1) * per) for d in range(devices)]
    expected = 0.05 * sum((sum(f[j] for j in g) / per) * sum(p[j] for j in g) for g in groups)
    assert res.losses["device"].item() == pytest.approx(expected, rel=1e-12)


def test_sequence_wise_loss_per_sequence_with_normalised_scores():
    # Sigmoid scores (DeepSeek-V3) so the per-token normalisation matters.
    module = layer({"sequence": 1e-3}, {"score": "sigmoid"})
    res = module(inputs(3))
    logits = res.routing["router_logits"].detach()
    s = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()]
    total = 0.0
    for b in range(B):
        seq = range(b * S, (b + 1) * S)
        f = [E / (K * S) * sum(1 for t in seq if i in hand_topk(s[t], K)) for i in range(E)]
        p = [sum(s[t][i] / sum(s[t]) for t in seq) / S for i in range(E)]
        total += sum(f[i] * p[i] for i in range(E))
    assert res.losses["sequence"].item() == pytest.approx(1e-3 * total / B, rel=1e-12)


def test_z_loss():
    res, logits, _ = run(layer({"z_loss": 1e-3}), inputs(4))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert res.losses["z_loss"].item() == pytest.approx(1e-3 * sum(v * v for v in lse) / T, rel=1e-12)


def test_losses_combine_and_backpropagate_to_router():
    module = layer({"expert": 0.01, "z_loss": 1e-3, "switch": 0.01})
    res = module(inputs(5))
    assert res.aux_loss.item() == pytest.approx(sum(v.item() for v in res.losses.values()), rel=1e-12)
    res.aux_loss.backward()
    assert module.router.weight.grad.abs().sum() > 0


def test_aux_free_selects_on_biased_score_and_weighs_by_raw_score():
    module = layer({"aux_free": {"gamma": 0.01}}, {"score": "sigmoid"})
    with torch.no_grad():
        module.router.bias.copy_(torch.tensor([0.0, 0.0, 5.0, -5.0]))
    res = module(inputs(6))
    logits = res.routing["router_logits"].detach()
    for t in range(T):
        s = [1 / (1 + math.exp(-v)) for v in logits[t].tolist()]
        biased = [s[i] + [0.0, 0.0, 5.0, -5.0][i] for i in range(E)]
        chosen = hand_topk(biased, K)
        assert res.routing["expert_idx"][t].tolist() == chosen
        assert chosen[0] == 2 and 3 not in chosen
        assert res.routing["weights"][t].tolist() == pytest.approx([s[i] for i in chosen], rel=1e-12)


def test_update_bias_sign_rule():
    module = layer({"aux_free": {"gamma": 0.25}})
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    module.update_bias(load)
    assert module.router.bias.tolist() == [-0.25, 0.25, 0.25, 0.25]
    assert not module.router.bias.requires_grad
    module.update_bias(torch.tensor([5, 5, 5, 5]))  # balanced: sign(0) = 0, no move
    assert module.router.bias.tolist() == [-0.25, 0.25, 0.25, 0.25]


def test_bias_update_balances_a_skewed_router():
    data = {"hidden": 8, "experts": {"routed": 8, "width": 4, "top_k": 2}, "router": {"score": "sigmoid"},
            "balance": {"aux_free": {"gamma": 0.02}}}
    module = MoELayer.from_spec(spec_from_dict(data), seed=1).eval()
    x = torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    with torch.no_grad():
        module.router.weight[:2] += 0.4  # experts 0 and 1 win for most tokens
    history = []
    for _ in range(20):
        with torch.no_grad():
            load = module(x).routing["tokens_per_expert"]
        history.append(maxvio(load))
        module.update_bias(load)
    assert history[0] > 2.0
    assert all(b < a for a, b in zip(history[:5], history[1:5]))  # monotone while far from balance
    assert max(history[-5:]) < 0.2 * history[0]


def test_noisy_topk_adds_scaled_noise_in_training_only():
    gen_seed = 11
    module = layer(router={"noise": {"std": 0.5}})
    x = inputs(7)
    tokens = x.reshape(-1, H)
    clean = tokens @ module.router.weight.detach().T
    module.generator = torch.Generator().manual_seed(gen_seed)
    module.train()
    noisy = module(x).routing["router_logits"].detach()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64)
    softplus = torch.log1p(torch.exp(tokens @ module.router.noise_weight.detach().T))
    torch.testing.assert_close(noisy, clean + 0.5 * noise * softplus, rtol=1e-12, atol=1e-12)
    module.eval()
    torch.testing.assert_close(module(x).routing["router_logits"], clean, rtol=1e-12, atol=1e-12)


def _ffn(module, e, x):
    ex = module.experts
    return (torch.nn.functional.silu(x @ ex.w_gate[e].T) * (x @ ex.w_up[e].T)) @ ex.w_down[e].T


def test_expert_choice_each_expert_takes_its_top_c_tokens():
    factor = 1.0
    module = layer(router={"choice": "expert"}, capacity={"factor": factor})
    x = inputs(8)
    res = module(x)
    tokens = x.reshape(-1, H)
    s = hand_scores(res.routing["router_logits"].detach())
    c = min(T, math.ceil(factor * T * K / E))
    expected = torch.zeros(T, H, dtype=torch.float64)
    chosen = []
    for e in range(E):
        picks = sorted(range(T), key=lambda t: -s[t][e])[:c]
        chosen.extend(picks)
        for t in picks:
            expected[t] += s[t][e] * _ffn(module, e, tokens[t])
    assert res.routing["rows"].tolist() == chosen
    assert res.routing["tokens_per_expert"].tolist() == [c] * E
    torch.testing.assert_close(res.out.reshape(-1, H).detach(), expected, rtol=1e-12, atol=1e-12)


def test_shared_experts_and_gate_by_hand():
    module = layer(experts={"shared": 2, "shared_gate": True})
    x = inputs(9)
    res = module(x)
    tokens = x.reshape(-1, H)
    idx, w = res.routing["expert_idx"], res.routing["weights"]

    def shared(i, v):
        sh = module.shared.get_submodule(str(i))
        return (torch.nn.functional.silu(v @ sh.w_gate.T) * (v @ sh.w_up.T)) @ sh.w_down.T

    for t in range(T):
        routed = sum(w[t, j] * _ffn(module, int(idx[t, j]), tokens[t]) for j in range(K))
        gate = 1 / (1 + math.exp(-float((tokens[t] @ module.shared_gate.weight[0]).detach())))
        expected = routed + gate * (shared(0, tokens[t]) + shared(1, tokens[t]))
        torch.testing.assert_close(res.out.reshape(-1, H)[t], expected, rtol=1e-12, atol=1e-12)


def test_maxvio_formula_and_tracker(tmp_path, capsys):
    assert maxvio([4, 4, 4, 4]) == 0.0
    assert maxvio([10, 2, 4, 4]) == pytest.approx((10 - 5) / 5)
    assert maxvio([8, 0, 0, 0]) == pytest.approx(3.0)
    tracker = MaxVioTracker()
    assert tracker.update({"l0": torch.tensor([6, 2]), "l1": [4, 4]}) == {"l0": 0.5, "l1": 0.0}
    tracker.update({"l0": [2, 6], "l1": [5, 3]})
    summary = tracker.summary()
    assert summary["l0"]["batch_mean"] == pytest.approx(0.5)
    assert summary["l0"]["global"] == pytest.approx(0.0)  # 8 and 8 over the run
    assert summary["l1"]["batch_mean"] == pytest.approx(0.125)
    path = tmp_path / "loads.json"
    path.write_text(tracker.to_json())
    assert json.loads(path.read_text())["l0"] == [[6.0, 2.0], [2.0, 6.0]]
    assert maxvio_main([str(path)]) == 0
    assert "l0" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ('{"l": 5}', "layer 'l': expected a non-empty list of per-step loads"),
    ('{"l": []}', "layer 'l': expected a non-empty list of per-step loads"),
    ('{"l": [[]]}', "layer 'l', step 0: expected a non-empty list of token counts"),
    ('{"l": [[1, null]]}', "layer 'l', step 0: expected a non-empty list of token counts"),
    ('{"l": [[1, -5]]}', "layer 'l', step 0: expected a non-empty list of token counts"),
    ('{"l": [[1, 2], [1, 2, 3]]}', "layer 'l', step 1: 3 experts, step 0 has 2"),
    ("[1, 2]", "a loads file maps layer name"),
    ("{bad", "Expecting property name"),
])
def test_maxvio_cli_reports_bad_loads_files_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "loads.json"
    path.write_text(content)
    assert maxvio_main([str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: {message}" in err[0], err


def test_maxvio_rejects_loads_that_are_not_counts():
    with pytest.raises(ValueError, match="token counts"):
        maxvio([3, -1, 2])
    with pytest.raises(ValueError, match="token counts"):
        maxvio([3, float("nan")])


def test_moe_ir_maxvio_json(tmp_path, capsys):
    from moe_ir.cli import main as cli_main

    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"l0": [[6, 2], [2, 6]], "l1": [[4, 4], [5, 3]]}))
    assert cli_main(["maxvio", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["l0"] == {"batch_mean": 0.5, "global": 0.0, "steps": 2.0}  # (6-4)/4 each step; 8 and 8 in all
    assert report["l1"] == {"batch_mean": pytest.approx(0.125), "global": pytest.approx(0.125), "steps": 2.0}  # 9, 7
    assert cli_main(["maxvio", str(path), "--last", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["l1"]["batch_mean"] == pytest.approx(0.25)
