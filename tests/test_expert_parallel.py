"""Expert parallelism on gloo over loopback: 2 and 4 local processes against the single-process eager
module (float64) on the same global weights and inputs.

Four processes are launched ONCE (a module-scoped fixture): every case runs with EP=4 on the world and
with EP=2 on the subgroups {0,1} and {2,3}; each rank saves out / routing / losses / gradients for its
slice of the batch, and the parent compares them with the eager module run on the whole batch. The objective on rank r is sum(out_r * G_r) + aux_loss_r, so the
single-process equivalent is sum(out * G) + Σ_r aux_loss(x_r) (balance losses are per-rank statistics),
with the communication loss written out by hand here from the eager routing record.
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_ir.backends.expert_parallel import shard_weights, spawn_local, unshard_weights
from moe_ir.backends.torch_eager import MoELayer
from moe_ir.builder import build_graph
from moe_ir.errors import SpecError
from moe_ir.params import init_weights
from moe_ir.spec import spec_from_dict, spec_to_dict

H, E, F_, BATCH_PER_RANK, SEQ = 8, 8, 6, 2, 3


def _spec_data(case: str, world: int) -> dict:
    base = {"hidden": H, "experts": {"routed": E, "width": F_, "top_k": 2, "shared": 1, "bias": True},
            "balance": {"expert": 0.01, "z_loss": 0.001, "device": {"alpha": 0.05, "devices": world}},
            "parallel": {"expert_parallel": world, "communication": 0.02}}
    if case == "dropless":
        return base
    if case == "device_limited":
        # 3 of 8 experts within M devices: M=1 of 2 (4 experts each) or M=2 of 4 (2 experts each).
        base["experts"]["top_k"] = 3
        base["parallel"]["device_limit"] = 1 if world == 2 else 2
        return base
    if case == "sigmoid_aux_free":
        base["router"] = {"score": "sigmoid", "normalize": True, "scaling": 2.5}
        base["balance"]["aux_free"] = {"gamma": 0.01}
        base["balance"]["sequence"] = 0.01
        return base
    if case == "zero_tokens_rank1":
        base["experts"]["activation"] = "gelu"
        return base
    if case == "shared_tensor_parallel":
        base["experts"].update(shared=2, shared_width=8, shared_gate=True, activation="geglu")
        base["parallel"]["shared"] = "tensor_parallel"
        return base
    raise KeyError(case)


CASES = ["dropless", "device_limited", "sigmoid_aux_free", "zero_tokens_rank1", "shared_tensor_parallel"]


def _inputs(case: str, world: int):
    spec = spec_from_dict(_spec_data(case, world))
    weights = init_weights(build_graph(spec, training=True), seed=3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(BATCH_PER_RANK * world, SEQ, H, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    if case == "sigmoid_aux_free":
        weights["router.bias"] = torch.randn(E, generator=gen, dtype=torch.float64) * 0.1
    if case == "zero_tokens_rank1":
        # Positive tokens and all-negative router rows for rank 1's experts: no token ever picks them.
        x = x.abs() + 0.1
        block = range(E // world, 2 * E // world)
        weights["router.weight"][block] = -2.0
    return spec, weights, x, g


def _ep_worker(rank: int, world: int, path: str) -> None:
    """On 4 processes: every case with EP=4 on the whole world, and with EP=2 on the subgroups {0,1}
    and {2,3} at once (so group ranks differ from global ranks on the second pair)."""
    import torch.distributed as dist

    from moe_ir.backends.expert_parallel import ExpertParallelMoE

    # new_group is collective over the world: every process creates every group, in the same order.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    shared_pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    shared_all = dist.new_group(list(range(world)))
    results = {}
    for ep, group, shared_group in ((2, pairs[rank // 2], shared_pairs[rank // 2]), (4, None, shared_all)):
        group_rank = dist.get_rank(group)
        for case in CASES:
            spec, weights, x, g = _inputs(case, ep)
            layer = ExpertParallelMoE.from_global(spec, weights, group=group, shared_group=shared_group)
            rows = slice(group_rank * BATCH_PER_RANK, (group_rank + 1) * BATCH_PER_RANK)
            xr = x[rows].clone().requires_grad_(True)
            res = layer(xr)
            ((res.out * g[rows]).sum() + res.aux_loss).backward()
            grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                     for n, p in layer.named_parameters()}
            results[ep, case] = {"out": res.out.detach(), "expert_idx": res.routing["expert_idx"],
                                 "losses": {k: v.detach() for k, v in res.losses.items()}, "grads": grads,
                                 "x_grad": xr.grad.detach(), "comm": res.comm._asdict(),
                                 "state": {k: v.detach().clone() for k, v in layer.state_dict().items()}}
    torch.save(results, f"{path}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    spawn_local(_ep_worker, 4, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.fixture(params=[2, 4], ids=["ep2", "ep4"])
def ep_runs(request, ep_results):
    """(EP degree, [per group: {case: [result of group rank 0, 1, ...]}]): two groups for EP=2."""
    ep = request.param
    groups = [[0, 1], [2, 3]] if ep == 2 else [[0, 1, 2, 3]]
    return ep, [{case: [ep_results[r][ep, case] for r in ranks] for case in CASES} for ranks in groups]


def _communication_loss(alpha, scores, expert_idx, world, limit):
    """DeepSeek-V2 α3 Σ_d f''_d P''_d, written out token by token."""
    t = scores.shape[0]
    per_device = E // world
    sent = [0] * world
    for row in expert_idx.tolist():
        for d in {e // per_device for e in row}:
            sent[d] += 1
    p = scores.mean(dim=0)
    return alpha * sum(world / (limit * t) * sent[d] * p[d * per_device:(d + 1) * per_device].sum()
                       for d in range(world))


def _oracle(case: str, world: int):
    """Eager single-process module: outputs on the whole batch and the gradients of the same objective."""
    spec, weights, x, g = _inputs(case, world)
    layer = MoELayer.from_spec(spec, training=True, weights=weights)
    x = x.clone().requires_grad_(True)
    full = layer(x)
    objective = (full.out * g).sum()
    per_rank_losses = []
    p = spec.parallel
    limit = p.device_limit or min(spec.experts.top_k, world)
    for r in range(world):
        part = layer(x[r * BATCH_PER_RANK:(r + 1) * BATCH_PER_RANK])
        logits = part.routing["router_logits"]
        scores = torch.softmax(logits, -1) if spec.router.score.value == "softmax" else torch.sigmoid(logits)
        losses = dict(part.losses)
        losses["communication"] = _communication_loss(p.communication, scores, part.routing["expert_idx"], world,
                                                      limit)
        per_rank_losses.append(losses)
        objective = objective + sum(losses.values())
    objective.backward()
    grads = {n: prm.grad for n, prm in layer.named_parameters()}
    return spec, full, x.grad, grads, per_rank_losses


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_single_process(ep_runs, case):
    world, groups = ep_runs
    spec, full, x_grad, grads, losses = _oracle(case, world)
    for got in (grp[case] for grp in groups):
        _check_against_oracle(world, spec, got, full, x_grad, grads, losses)


def _check_against_oracle(world, spec, got, full, x_grad, grads, losses):
    torch.testing.assert_close(torch.cat([r["expert_idx"] for r in got]), full.routing["expert_idx"])
    torch.testing.assert_close(torch.cat([r["out"] for r in got]), full.out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in got]), x_grad, rtol=1e-11, atol=1e-12)
    ep_grads = unshard_weights([r["grads"] for r in got], spec, replicated="sum")
    assert set(ep_grads) == set(grads)
    for name, want in grads.items():
        want = want if want is not None else torch.zeros_like(ep_grads[name])
        torch.testing.assert_close(ep_grads[name], want, rtol=1e-11, atol=1e-12, msg=f"gradient of {name}")
    for r in range(world):
        assert set(got[r]["losses"]) == set(losses[r]), (got[r]["losses"].keys(), losses[r].keys())
        for kind, value in losses[r].items():
            torch.testing.assert_close(got[r]["losses"][kind], value.detach(), rtol=1e-12, atol=1e-14,
                                       msg=f"rank {r} loss {kind}")


def test_state_dicts_are_canonical_shards(ep_runs):
    world, groups = ep_runs
    ranks = groups[-1]
    for case in ("dropless", "shared_tensor_parallel"):
        spec, weights, _, _ = _inputs(case, world)
        for r in range(world):
            state = ranks[case][r]["state"]
            want = shard_weights(weights, spec, r)
            assert set(state) == set(weights)
            for name in want:
                torch.testing.assert_close(state[name], want[name], rtol=0, atol=0)
        merged = unshard_weights([ranks[case][r]["state"] for r in range(world)], spec)
        for name in weights:
            torch.testing.assert_close(merged[name], weights[name], rtol=0, atol=0)
    # The expert block is the rank's slice: rank 1 holds experts [E/D, 2E/D).
    assert ranks["dropless"][1]["state"]["experts.w_up"].shape[0] == E // world


def test_rank_receiving_no_tokens(ep_runs):
    world, groups = ep_runs
    ranks = groups[-1]["zero_tokens_rank1"]
    comm = [r["comm"] for r in ranks]
    assert sum(comm[1]["recv_rows"]) == 0
    assert all(c["send_rows"][1] == 0 for c in comm)
    assert sum(sum(c["recv_rows"]) for c in comm) > 0
    assert float(ranks[1]["grads"]["experts.w_up"].abs().max()) == 0.0
    # The other ranks' experts did get gradient through the same all-to-alls.
    assert float(ranks[0]["grads"]["experts.w_up"].abs().max()) > 0.0


def test_device_limit_bounds_devices_per_token(ep_runs):
    world, groups = ep_runs
    ranks = groups[-1]["device_limited"]
    limit = 1 if world == 2 else 2
    per_device = E // world
    idx = torch.cat([r["expert_idx"] for r in ranks])
    assert max(len({e // per_device for e in row}) for row in idx.tolist()) <= limit
    # The limit is active: unlimited top-3 routing of the same tokens reaches more devices somewhere.
    spec, weights, x, _ = _inputs("device_limited", world)
    data = _spec_data("device_limited", world)
    del data["parallel"]["device_limit"]
    free = MoELayer.from_spec(spec_from_dict(data), training=True, weights=weights)
    free_idx = free(x).routing["expert_idx"]
    assert max(len({e // per_device for e in row}) for row in free_idx.tolist()) > limit
    # Deduplicated dispatch: rows sent = distinct (token, device) pairs.
    sent = sum(sum(r["comm"]["send_rows"]) for r in ranks)
    assert sent == sum(len({e // per_device for e in row}) for row in idx.tolist())


def test_comm_bytes_count_remote_rows(ep_runs):
    world, groups = ep_runs
    ranks = groups[-1]["dropless"]
    local = E // world
    payload_row = (H + 2 * local) * 8  # float64 hidden + gate + mask columns
    for r, res in enumerate(ranks):
        c = res["comm"]
        out_rows = sum(c["send_rows"]) - c["send_rows"][r]
        in_rows = sum(c["recv_rows"]) - c["recv_rows"][r]
        assert c["bytes_sent"] == out_rows * payload_row + in_rows * H * 8
        assert c["bytes_received"] == in_rows * payload_row + out_rows * H * 8


# -- spec checks (no processes) -------------------------------------------------------------------


@pytest.mark.parametrize("parallel, extra, key", [
    ({"expert_parallel": 3}, {}, "parallel.expert_parallel"),
    ({"expert_parallel": 2, "device_limit": 3}, {}, "parallel.device_limit"),
    ({"expert_parallel": 4, "device_limit": 1}, {"experts": {"routed": 8, "width": 4, "top_k": 3}},
     "parallel.device_limit"),
    ({"expert_parallel": 2, "device_limit": 1}, {"router": {"group_limit": {"groups": 4, "kept": 2}}},
     "parallel.device_limit"),
    ({"expert_parallel": 2}, {"balance": {"device": {"alpha": 0.1, "devices": 4}}}, "balance.device.devices"),
    ({"expert_parallel": 2, "shared": "tensor_parallel"}, {}, "parallel.shared"),
])
def test_parallel_spec_errors_name_the_key(parallel, extra, key):
    data = {"hidden": 8, "experts": {"routed": 8, "width": 4, "top_k": 2}, "parallel": parallel, **extra}
    with pytest.raises(SpecError) as err:
        spec_from_dict(data)
    assert err.value.path == key


def test_device_limit_is_group_limit_in_the_graph():
    spec = spec_from_dict({"hidden": 8, "experts": {"routed": 8, "width": 4, "top_k": 2},
                           "parallel": {"expert_parallel": 4, "device_limit": 2}})
    route = next(n for n in build_graph(spec).nodes if n.name == "route")
    assert (route.attrs["groups"], route.attrs["kept"], route.attrs["group_score"].value) == (4, 2, "max")
    plain = spec_from_dict({"hidden": 8, "experts": {"routed": 8, "width": 4, "top_k": 2}})
    assert "parallel" not in spec_to_dict(plain)  # specs without placement keep their canonical form


def test_inspect_reports_per_device_numbers():
    from moe_ir.analysis import analyse

    spec = spec_from_dict({"hidden": 16, "experts": {"routed": 8, "width": 4, "top_k": 2, "shared": 1},
                           "parallel": {"expert_parallel": 4, "device_limit": 2}})
    a = analyse(spec).parallel
    per_expert = 3 * 16 * 4
    assert a["experts_per_device"] == 2
    assert a["expert_params_per_device"] == 2 * per_expert
    assert a["a2a_bytes_per_token_max"] == 2 * 2 * 16 * 4  # min(k=2, M=2, ep-1=3) ranks, both ways, fp32
    # Uniform routing over the M=2 kept devices of 2 experts each: P(both experts on one device) = 2/C(4,2).
    distinct = 2 * (1 - math.comb(2, 2) / math.comb(4, 2))
    assert a["a2a_bytes_per_token_expected"] == pytest.approx(distinct * 3 / 4 * 2 * 16 * 4)


# -- tools/ep_train_step.py refuses a spec before starting processes ------------------------------


def _ep_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "ep_train_step.py"
    module_spec = importlib.util.spec_from_file_location("ep_train_step", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_check_spec_needs_no_process_group():
    from moe_ir.backends.expert_parallel import ExpertParallelMoE
    from moe_ir.errors import BackendError

    spec = spec_from_dict(_spec_data("dropless", 2))
    assert ExpertParallelMoE.check_spec(spec, 2).local_experts == E // 2
    with pytest.raises(BackendError, match="process group has 4 ranks"):
        ExpertParallelMoE.check_spec(spec, 4)
    expert_choice = spec_from_dict({"hidden": H, "experts": {"routed": E, "width": F_, "top_k": 2},
                                    "router": {"choice": "expert"}, "parallel": {"expert_parallel": 2}})
    with pytest.raises(BackendError, match="token-choice"):
        ExpertParallelMoE.check_spec(expert_choice, 2)


@pytest.mark.parametrize("argv, code, words", [
    (["--procs", "1,3"], 2, "parallel.expert_parallel: EP degree 3 must divide the 16 routed experts"),
    (["--spec", "no/such/spec.yaml"], 2, "no such spec file"),
    (["--spec", "EXPERT_CHOICE"], 1, "supports token-choice routing"),
])
def test_ep_tool_errors_are_one_line_before_any_process(argv, code, words, tmp_path, capsys, monkeypatch):
    tool = _ep_tool()
    spawned = []
    monkeypatch.setattr(tool, "spawn_local", lambda *a, **k: spawned.append(a))
    if "EXPERT_CHOICE" in argv:
        path = tmp_path / "ec.yaml"
        path.write_text("hidden: 8\nexperts: {routed: 8, width: 4, top_k: 2}\nrouter: {choice: expert}\n")
        argv = ["--spec", str(path)]
    assert tool.main(argv + ["--steps", "1", "--warmup", "0"]) == code
    err = capsys.readouterr().err
    assert err.startswith("ep_train_step: error: ") and words in err and err.count("\n") == 1
    assert not spawned  # refused before the world of 1 was started too
