"""Expert parallelism on gloo over loopback, lowered from the layer graph.

1. Training (4 local processes, launched ONCE by a module-scoped fixture): every case runs with EP=4 on the
   world and with EP=2 on the subgroups {0,1} and {2,3}; each rank saves out / routing / losses / gradients
   for its slice of the batch, and the parent compares them with the single-process eager module (float64)
   run on the whole batch with the same global weights. The objective on rank r is sum(out_r * G_r) +
   aux_loss_r, so the single-process equivalent is sum(out * G) + Σ_r aux_loss(x_r) (balance losses are
   per-rank statistics), with the communication loss written out by hand here from the eager routing record.
2. The registered backend: `moe-ir validate --backends reference expert_parallel:2` passes, a pass
   (fuse-gate-up) reaches the lowering, and validation catches a deliberately wrong expert-parallel result.
3. The launcher: no socket listens beyond loopback, and a rank that dies or stops fails the run within the
   bounded timeout with a one-line error.
Results come back from the ranks as safetensors and JSON (no pickle).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ir.backends import get_backend
from moe_ir.backends.expert_parallel import (ExpertParallelBackend, ExpertParallelMoE, Placement, check_graph,
                                             shard_weights, spawn_local, unshard_weights)
from moe_ir.backends.expert_parallel.launch import STOP_GRACE
from moe_ir.backends.torch_eager import MoELayer
from moe_ir.builder import build_graph
from moe_ir.errors import BackendError, SpecError
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.spec import SharedPlacement, spec_from_dict, spec_to_dict

H, E, F_, BATCH_PER_RANK, SEQ = 8, 8, 6, 2, 3
SPECS = Path(__file__).resolve().parent.parent / "specs"


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


def _placement(spec, world: int) -> Placement:
    return Placement.of(build_graph(spec), world, spec.parallel.shared)


def _listening_sockets(pid: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state 0A: LISTEN
                found.append(fields[1])
    return found


def _is_loopback(address: str) -> bool:
    host = address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian hex: 127.x.x.x ends with 7F
        return host.endswith("7F")
    return host in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")  # ::1, ::ffff:127.0.0.1


def _ep_worker(rank: int, world: int, path: str) -> None:
    """On 4 processes: every case with EP=4 on the whole world, and with EP=2 on the subgroups {0,1}
    and {2,3} at once (so group ranks differ from global ranks on the second pair)."""
    import torch.distributed as dist

    # new_group is collective over the world: every process creates every group, in the same order.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    shared_pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    shared_all = dist.new_group(list(range(world)))
    tensors, meta = {}, {"listening": _listening_sockets(os.getpid()) if os.path.exists("/proc/net/tcp") else None}
    for ep, group, shared_group in ((2, pairs[rank // 2], shared_pairs[rank // 2]), (4, None, shared_all)):
        group_rank = dist.get_rank(group)
        for case in CASES:
            spec, weights, x, g = _inputs(case, ep)
            layer = ExpertParallelMoE.from_spec(spec, weights, group=group, shared_group=shared_group)
            rows = slice(group_rank * BATCH_PER_RANK, (group_rank + 1) * BATCH_PER_RANK)
            xr = x[rows].clone().requires_grad_(True)
            res = layer(xr)
            ((res.out * g[rows]).sum() + res.aux_loss).backward()
            key = f"{ep}/{case}"
            tensors[f"{key}/out"] = res.out.detach()
            tensors[f"{key}/expert_idx"] = res.routing["expert_idx"]
            tensors[f"{key}/x_grad"] = xr.grad.detach()
            for kind, value in res.losses.items():
                tensors[f"{key}/loss/{kind}"] = value.detach()
            for name, p in layer.named_parameters():
                tensors[f"{key}/grad/{name}"] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
            for name, value in layer.state_dict().items():
                tensors[f"{key}/state/{name}"] = value.detach()
            meta[key] = {"comm": res.comm._asdict()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{path}/rank{rank}.safetensors")
    Path(path, f"rank{rank}.json").write_text(json.dumps(meta))


def _unflatten(tensors: dict, meta: dict) -> dict:
    """{(ep, case): {"out", "expert_idx", "x_grad", "losses": {}, "grads": {}, "state": {}, "comm": {}}}."""
    results: dict = {}
    for key, value in tensors.items():
        ep, case, field, *rest = key.split("/")
        entry = results.setdefault((int(ep), case), {"losses": {}, "grads": {}, "state": {}})
        if rest:
            entry[{"loss": "losses", "grad": "grads", "state": "state"}[field]]["/".join(rest)] = value
        else:
            entry[field] = value
    for (ep, case), entry in results.items():
        entry["comm"] = meta[f"{ep}/{case}"]["comm"]
    results["listening"] = meta["listening"]
    return results


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    spawn_local(_ep_worker, 4, str(out))
    return [_unflatten(load_file(out / f"rank{r}.safetensors"), json.loads((out / f"rank{r}.json").read_text()))
            for r in range(4)]


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
    ep_grads = unshard_weights([r["grads"] for r in got], _placement(spec, world), replicated="sum")
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
        placement = _placement(spec, world)
        for r in range(world):
            state = ranks[case][r]["state"]
            want = shard_weights(weights, placement, r)
            assert set(state) == set(weights)
            for name in want:
                torch.testing.assert_close(state[name], want[name], rtol=0, atol=0)
        merged = unshard_weights([ranks[case][r]["state"] for r in range(world)], placement)
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


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the listening sockets from Linux's /proc")
def test_ranks_listen_on_loopback_only(ep_results):
    """The ranks meet through a file store (a TCP store would listen on every interface) and gloo's own
    sockets are bound to the loopback interface: nothing a rank listens on is reachable from the network."""
    for rank, result in enumerate(ep_results):
        listening = result["listening"]
        assert listening, f"rank {rank} listens on nothing: gloo's pair sockets should show here"
        assert all(_is_loopback(a) for a in listening), (rank, listening)


def test_loopback_check_tells_a_listener_on_every_interface_apart():
    """The check above would catch torch's TCP store, which listens on [::] (every interface)."""
    assert _is_loopback("0100007F:8D57") and _is_loopback("00000000000000000000000001000000:1F90")
    assert not _is_loopback("00000000000000000000000000000000:73AB")  # [::]:29611, the TCP store of env://
    assert not _is_loopback("00000000:1F90") and not _is_loopback("0200000A:1F90")  # 0.0.0.0, 10.0.0.2


# -- the registered backend: moe-ir validate -------------------------------------------------------


def test_moe_ir_validate_checks_expert_parallel(capsys):
    from moe_ir.cli import main

    assert main(["validate", str(SPECS / "tiny.yaml"), "--backends", "reference", "expert_parallel:2",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ep = report["results"][1]
    assert ep["backend"] == "expert_parallel:2" and ep["status"] == "ok"
    assert ep["routing"]["flips"] == 0 and ep["outputs"]["out"]["max_abs"] < 1e-5
    # tiny has 7 routed experts: 2 ranks hold blocks of 4 and 3.
    placement = check_graph(build_graph(spec_from_dict(_tiny_data())), 2)
    assert [placement.expert_range(r) for r in (0, 1)] == [range(0, 4), range(4, 7)]


def _tiny_data() -> dict:
    import yaml

    return yaml.safe_load((SPECS / "tiny.yaml").read_text())


class _GateUpFusedExpertParallel(ExpertParallelBackend):
    """The backend with one more pass: gate and up projections concatenated into one weight."""

    pipeline = ("fuse-shared-experts", "fuse-gate-up", "dce")


def test_a_pass_reaches_the_expert_parallel_lowering():
    """Tensor-parallel shared experts (two, fused into one wider ffn) and fused gate/up weights, on 7
    experts over 2 ranks: still the reference's numbers."""
    from moe_ir.validate import validate

    spec = spec_from_dict({"name": "ep-fused", "hidden": 16, "experts": {
        "routed": 7, "width": 8, "top_k": 2, "shared": 2, "shared_gate": True, "bias": True}})
    backend = _GateUpFusedExpertParallel("2-tp")
    piped = run_pipeline(build_graph(spec), backend.pipeline)
    assert {n.attrs["weight_layout"].value for n in piped.nodes if "weight_layout" in n.attrs} == {"gate_up_fused"}
    assert len([n for n in piped.nodes if n.op.value == "ffn"]) == 1
    report = validate(spec, [backend], tokens=12, batch=2, dtype="float64")
    (result,) = report.results
    assert result.backend == "expert_parallel:2-tp" and result.status == "ok", report.to_table()
    assert result.outputs["out"].max_abs < 1e-10


def _rank_with_misrouted_results(rank: int, world: int, folder: str, shared: str) -> None:
    """A deliberately wrong expert-parallel rank: the rows coming back from the experts are added to the
    wrong tokens (the combine's all-to-all result reversed), as an off-by-one in an exchange would."""
    from moe_ir.backends.expert_parallel import backend, module

    exchange = module.all_to_all_rows
    calls = []

    def reversed_results(rows, out_splits, in_splits, group=None):
        calls.append(None)
        got = exchange(rows, out_splits, in_splits, group)
        return got.flip(0) if len(calls) % 2 == 0 else got  # the 2nd all-to-all of each exchange: results

    module.all_to_all_rows = reversed_results
    backend.run_rank(rank, world, folder, shared)


class _WrongExpertParallel(ExpertParallelBackend):
    rank_main = staticmethod(_rank_with_misrouted_results)


def test_validate_catches_a_wrong_expert_parallel_result():
    from moe_ir.validate import validate

    report = validate(spec_from_dict(_tiny_data()), [get_backend("reference"), _WrongExpertParallel("2")])
    reference, wrong = report.results
    assert reference.status == "ok" and not report.ok
    assert wrong.status == "mismatch" and not wrong.outputs["out"].ok and wrong.outputs["out"].max_abs > 1e-2
    assert wrong.routing.flips == 0  # the routing itself was right: only the exchange was wrong


# -- the launcher: bounded failures ------------------------------------------------------------------


def _rank_that_dies(rank: int, world: int, folder: str, how: str) -> None:
    import torch.distributed as dist

    Path(folder, f"start{rank}").write_text(str(time.time()))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    dist.all_reduce(torch.ones(4))


@pytest.mark.parametrize("how, words", [
    ("killed", "rank 1 was killed by SIGKILL"),
    ("stopped", "rank 0: a collective did not complete within the 3 s timeout: another rank stopped, hung or died"),
])
def test_a_rank_that_dies_or_stops_fails_the_run_within_the_timeout(how, words, tmp_path):
    timeout = 3.0
    with pytest.raises(BackendError) as err:
        spawn_local(_rank_that_dies, 2, str(tmp_path), how, timeout=timeout)
    # From the first start mark: rank 1 may die while rank 0 is still connecting (gloo's mesh), before rank 0
    # writes its own mark, and that run must fail within the bound too.
    failed_after = time.time() - min(float(p.read_text()) for p in tmp_path.glob("start*"))
    message = str(err.value)
    assert message.startswith("expert-parallel run on 2 processes failed: ") and words in message
    assert "\n" not in message
    # From the moment the ranks met at the collective: the timeout, the others' grace and slack for a loaded
    # machine; without the bounded timeout a stopped rank would hold the run for torch's default 30 minutes.
    assert failed_after < timeout + STOP_GRACE + 10, failed_after
    if how == "stopped":
        assert failed_after >= timeout - 0.5  # rank 0 waited for the collective's timeout, no longer


def test_a_rank_error_is_one_line(tmp_path):
    with pytest.raises(BackendError, match=r"^expert-parallel run on 2 processes failed: rank \d: "
                                           r"ZeroDivisionError: division by zero$"):
        spawn_local(_rank_that_raises, 2)


def _rank_that_raises(rank: int, world: int) -> None:
    1 / 0


# -- support and variants (no processes) ------------------------------------------------------------


@pytest.mark.parametrize("data, words", [
    ({"router": {"choice": "expert"}}, "supports token-choice routing"),
    ({"capacity": {"factor": 1.25}}, "expert parallelism is dropless; the dispatch has capacity factor 1.25"),
    ({"experts": {"routed": 3, "width": 4, "top_k": 2}}, "4 ranks for 3 routed experts"),
])
def test_supports_gives_reasons(data, words):
    spec = spec_from_dict({"hidden": 8, "experts": {"routed": 8, "width": 4, "top_k": 2}, **data})
    backend = get_backend("expert_parallel:4")
    ok, reason = backend.supports(run_pipeline(build_graph(spec), backend.pipeline))
    assert not ok and words in reason


def test_supports_refuses_model_graphs_and_fused_layers():
    from moe_ir.model_builder import build_model_graph
    from moe_ir.model_spec import model_spec_from_dict

    backend = get_backend("expert_parallel")
    assert backend.label == "expert_parallel:2"
    layer = {"hidden": 16, "experts": {"routed": 4, "width": 8, "top_k": 2}}
    model = model_spec_from_dict({"model": {"name": "m", "vocab_size": 32, "hidden": 16, "layers": 1,
                                            "attention": {"kind": "mha", "heads": 2}},
                                  "moe": {"experts": layer["experts"]}})
    ok, reason = backend.supports(build_model_graph(model))
    assert not ok and "model graph; expert parallelism runs one MoE layer" in reason
    fused = run_pipeline(build_graph(spec_from_dict(layer)), ("fuse-moe", "dce"))
    ok, reason = backend.supports(fused)
    assert not ok and "fused_moe op hides the dispatch" in reason
    tp = get_backend("expert_parallel:2-tp")
    ok, reason = tp.supports(build_graph(spec_from_dict(layer)))
    assert not ok and "tensor-parallel shared experts need a shared expert" in reason


@pytest.mark.parametrize("variant", ["0", "two", "2-pp", "-tp"])
def test_bad_variants_are_clear_errors(variant):
    with pytest.raises(BackendError, match="the variant is the number of local processes"):
        get_backend(f"expert_parallel:{variant}")


def test_uneven_placement_round_trips():
    spec = spec_from_dict({"hidden": 8, "experts": {"routed": 7, "width": 6, "top_k": 2, "shared": 1},
                           "parallel": {"expert_parallel": 1}})
    graph = build_graph(spec)
    placement = Placement.of(graph, 3, SharedPlacement.TENSOR_PARALLEL)
    assert [placement.expert_range(r) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]
    assert placement.expert_slots().tolist() == [0, 1, 2, 3, 4, 7, 5, 6, 7]
    assert placement.shard_dim("shared.0.w_down") == 1 and placement.shard_dim("shared.0.w_up") == 0
    assert placement.shard_dim("router.weight") is None
    weights = init_weights(graph, 0)
    shards = [shard_weights(weights, placement, r) for r in range(3)]
    assert [s["experts.w_up"].shape[0] for s in shards] == [3, 2, 2]
    assert [s["shared.0.w_up"].shape[0] for s in shards] == [2, 2, 2]  # shared width 6 over 3 ranks
    merged = unshard_weights(shards, placement)
    assert all(torch.equal(merged[name], weights[name]) for name in weights)


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

    path = Path(__file__).resolve().parent.parent / "tools" / "ep_train_step.py"
    module_spec = importlib.util.spec_from_file_location("ep_train_step", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_check_spec_needs_no_process_group():
    spec = spec_from_dict(_spec_data("dropless", 2))
    options = ExpertParallelMoE.check_spec(spec, 2)
    assert options == {"shared": SharedPlacement.REPLICATED, "communication": 0.02, "gamma": None}
    assert check_graph(build_graph(spec), 2).max_local_experts == E // 2
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
