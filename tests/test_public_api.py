"""The public surface is one list; changing it is a deliberate act that shows up here."""
import moe_ir

EXPECTED = {
    "BackendError", "IRError", "LayerSpec", "MoeIRError", "PIPELINES", "PassError", "SpecError", "WeightsError",
    "analyse", "build_graph", "get_backend", "init_weights", "interpret", "json_schema", "load_spec",
    "load_weights", "run_pipeline", "save_weights", "spec_from_dict", "spec_to_dict",
}


def test_public_api_is_pinned():
    assert set(moe_ir.__all__) == EXPECTED
    for name in moe_ir.__all__:
        assert hasattr(moe_ir, name), name


def test_quickstart_through_the_public_api():
    import torch

    from conftest import SPECS

    spec = moe_ir.load_spec(SPECS / "tiny.yaml")
    graph = moe_ir.run_pipeline(moe_ir.build_graph(spec), moe_ir.PIPELINES["fused"])
    weights = {k: v for k, v in moe_ir.init_weights(moe_ir.build_graph(spec)).items() if k in graph.weights}
    out = moe_ir.interpret(graph, {"x": torch.ones(1, 3, spec.hidden)}, weights)["out"]
    assert out.shape == (1, 3, spec.hidden) and torch.isfinite(out).all()
