"""`moe-ir build --backend torch`: the generated model.py is standalone (torch only) and equals the
in-memory eager module (outputs, routing record and losses), and the bundle is written all or nothing."""
from __future__ import annotations

import ast
import sys
import textwrap

import pytest
import torch
import yaml

from moe_ir.backends import get_backend
from moe_ir.backends.torch_eager import MoELayer
from moe_ir.builder import build_graph
from moe_ir.errors import WeightsError
from moe_ir.spec import spec_from_dict, spec_to_dict

from conftest import import_file

BASE = {"hidden": 10, "experts": {"routed": 8, "width": 6, "top_k": 2}}
CASES = {
    "deepseek-moe": {"experts": {"routed": 8, "width": 6, "top_k": 2, "shared": 2}, "balance": {"expert": 0.01,
                     "device": {"alpha": 0.05, "devices": 2}}},
    "deepseek-v3": {"experts": {"routed": 8, "width": 6, "top_k": 2, "shared": 1},
                    "router": {"score": "sigmoid", "group_limit": {"groups": 4, "kept": 2, "score": "top2_sum"},
                               "normalize": True, "scaling": 2.5},
                    "balance": {"aux_free": {"gamma": 0.001}, "sequence": 1e-4}},
    "qwen-gated-shared": {"experts": {"routed": 8, "width": 6, "top_k": 2, "shared": 1, "shared_width": 12,
                                      "shared_gate": True}, "balance": {"switch": 0.01, "z_loss": 1e-3}},
    "capacity-noise-bias": {"experts": {"routed": 8, "width": 6, "top_k": 2, "bias": True, "activation": "geglu"},
                            "router": {"noise": {"std": 1.0}}, "capacity": {"factor": 1.0, "drop": "position"}},
    # Device-limited routing (parallel.device_limit) is a group limit the generated source must apply too.
    "device-limited": {"experts": {"routed": 8, "width": 6, "top_k": 3},
                       "parallel": {"expert_parallel": 4, "device_limit": 2}},
    "expert-choice-relu": {"experts": {"routed": 8, "width": 6, "top_k": 2, "activation": "relu"},
                           "router": {"choice": "expert"}, "balance": {"z_loss": 1e-3}},
}


def import_model(path):
    return import_file(path, f"generated_{path.parent.name}")


@pytest.mark.parametrize("name", list(CASES))
def test_generated_source_equals_module(name, tmp_path):
    spec = spec_from_dict({**BASE, **CASES[name]})
    graph = build_graph(spec, training=True)
    module = MoELayer.from_spec(spec, seed=3)
    out_dir = tmp_path / name
    result = get_backend("torch").build(spec, graph, module.canonical_weights(), out_dir)
    assert sorted(p.name for p in result.files) == ["model.py", "spec.yaml", "weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no staging folder left behind

    source = (out_dir / "model.py").read_text()
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom)}
    # torch and the standard library only: the file runs where moe_ir is not installed
    assert {m for m in imported if m not in sys.stdlib_module_names} == {"torch"}
    # Only the options the spec uses are in the file.
    assert ("dispatch_capacity" in source) == (spec.capacity.factor is not None and spec.router.choice == "token")
    assert ("router_noise" in source) == (spec.router.noise is not None)
    assert ("update_bias" in source) == (spec.balance.aux_free is not None)
    if spec.routing_group_limit is not None:
        gl = spec.routing_group_limit
        assert f"{gl.groups}, {gl.kept}, {gl.score.value!r}" in source
    assert yaml.safe_load((out_dir / "spec.yaml").read_text()) == spec_to_dict(spec)

    from safetensors.torch import load_file

    generated = import_model(out_dir / "model.py").MoELayer()
    generated.load_state_dict(load_file(str(out_dir / "weights.safetensors")), strict=True)
    x = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(0))
    for train in (False, True):
        module.train(train)
        generated.train(train)
        seed = 5
        module.generator = torch.Generator().manual_seed(seed)
        out, routing, losses = generated(x, generator=torch.Generator().manual_seed(seed))
        res = module(x)
        assert torch.equal(out, res.out)
        assert routing.keys() == res.routing.keys() and losses.keys() == res.losses.keys()
        for key in routing:
            assert torch.equal(routing[key], res.routing[key]), key
        for key in losses:
            assert torch.equal(losses[key], res.losses[key]), key
    if spec.balance.aux_free is not None:
        load = routing["tokens_per_expert"]
        generated.update_bias(load)
        module.update_bias(load)
        assert torch.equal(generated.router.bias, module.router.bias) and generated.router.bias.abs().sum() > 0


def test_build_writes_nothing_on_bad_weights(tmp_path):
    spec = spec_from_dict(BASE)
    graph = build_graph(spec)
    weights = MoELayer(graph).canonical_weights()
    weights = {k: v.detach() for k, v in weights.items()}
    weights["experts.w_up"] = torch.zeros(8, 5, 10)
    with pytest.raises(WeightsError, match="experts.w_up"):
        get_backend("torch").build(spec, graph, weights, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_generated_docstring_survives_quotes_and_backslashes(tmp_path):
    """`source` is free text; it must neither break model.py nor end its docstring and become code."""
    source = 'notes at C:\\xdocs\\Nfile """\nraise SystemExit("escaped the docstring")\n"""'
    spec = spec_from_dict({**BASE, "source": source})
    module = MoELayer.from_spec(spec, seed=1)
    get_backend("torch").build(spec, build_graph(spec, training=True), module.canonical_weights(), tmp_path / "o")
    generated = import_model(tmp_path / "o" / "model.py")
    embedded = textwrap.dedent(generated.__doc__.split("\n\n", 2)[2])  # the spec, as YAML
    assert yaml.safe_load(embedded)["source"] == source
    assert hasattr(generated, "MoELayer")


def _defined_functions(source):
    tree = ast.parse(source)
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)]


def test_generated_functions_are_the_kernel_set_verbatim(tmp_path):
    """Every function model.py defines is copied from torch_kernels / torch_ops.py, textually identical."""
    import inspect

    from moe_ir.backends import torch_source

    spec = spec_from_dict({**BASE, **CASES["deepseek-v3"]})
    module = MoELayer.from_spec(spec, seed=2)
    get_backend("torch").build(spec, module.graph, module.canonical_weights(), tmp_path / "o")
    source = (tmp_path / "o" / "model.py").read_text()
    functions = _defined_functions(source)
    assert {"route_topk", "topk_route", "dispatch", "grouped_ffn", "expert_ffns", "combine"} <= {f.name for f in functions}
    for node in functions:
        original = inspect.getsource(torch_source.FUNCTIONS[node.name]).rstrip()
        assert ast.get_source_segment(source, node) == original, node.name


def test_a_pass_changes_the_generated_source(tmp_path):
    """model.py is emitted from the lowered graph: fuse-gate-up / fuse-shared-experts show up in it, and the
    file still equals the eager module of that graph bitwise."""
    from safetensors.torch import load_file

    from moe_ir.passes import run_pipeline

    spec = spec_from_dict({**BASE, **CASES["deepseek-moe"]})
    plain = build_graph(spec)
    weights = MoELayer(plain, seed=4).canonical_weights()
    fused = run_pipeline(build_graph(spec), ("fuse-shared-experts", "fuse-gate-up", "dce"))
    backend = get_backend("torch")
    backend.build(spec, plain, weights, tmp_path / "plain")
    backend.build(spec, fused, {k: v for k, v in weights.items() if k in fused.weights}, tmp_path / "fused")
    before = (tmp_path / "plain" / "model.py").read_text()
    after = (tmp_path / "fused" / "model.py").read_text()
    assert "concat(" not in before and "'gate_up_fused'" not in before
    assert "concat(" in after and "'gate_up_fused'" in after and "fuse-gate-up" in after
    assert after.count(" = dense_ffn(") == 1 and before.count(" = dense_ffn(") == 2  # two shared experts, fused

    module = MoELayer(fused, {k: v for k, v in weights.items() if k in fused.weights}).eval()
    generated = import_model(tmp_path / "fused" / "model.py").MoELayer().eval()
    generated.load_state_dict(load_file(str(tmp_path / "fused" / "weights.safetensors")), strict=True)
    x = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, routing, _ = generated(x)
        res = module(x)
    assert torch.equal(out, res.out) and torch.equal(routing["expert_idx"], res.routing["expert_idx"])
    plain_out = MoELayer(plain, weights).eval()(x).out
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-6)  # the passes keep the numbers


def test_graph_kind_is_set_by_the_builders_and_survives_json():
    from moe_ir.ir import GraphKind, from_json, to_json

    graph = build_graph(spec_from_dict(BASE))
    assert graph.kind == GraphKind.LAYER and from_json(to_json(graph)).kind == GraphKind.LAYER
