"""Shared fixtures. TRITON_INTERPRET must be set before triton is first imported, so it is set here:
on machines without a GPU every Triton kernel in the suite runs in the interpreter (slow, exact)."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
SPEC_FILES = sorted(SPECS.glob("*.yaml"))


def tiny_model_yaml(name: str, attention: str, *, layers: int = 2, first_dense: int = 1) -> str:
    """A model spec of odd sizes (vocabulary 61, hidden 24): `first_dense` dense layers, then MoE layers of
    5 routed + 1 shared experts; `attention` is a flow mapping such as "{kind: gqa, heads: 4, ...}"."""
    dense = f"  first_dense: {first_dense}\n  dense_width: 20\n" if first_dense else ""
    return (f"model:\n  name: {name}\n  vocab_size: 61\n  hidden: 24\n  layers: {layers}\n{dense}"
            f"  attention: {attention}\nmoe:\n  experts: {{routed: 5, shared: 1, width: 6, top_k: 2}}\n"
            "  router: {score: softmax, normalize: true}\n")


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return SPECS


def import_file(path: Path, name: str):
    """Import a standalone source file (a generated model.py) as a module of its own, outside moe_ir."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def logits_on_backends(spec, weights, ids, backends=("torch", "onnx:portable", "onnx:ort")) -> dict:
    """{"reference": .., backend: ..}: the float32 logits of a model spec's prefill graph for input_ids `ids`, from
    the reference interpreter and from each backend (its pipeline run, its supports() asserted)."""
    from moe_ir.backends import get_backend
    from moe_ir.interpreter import interpret
    from moe_ir.model_builder import build_model_graph
    from moe_ir.passes import run_pipeline

    got = {"reference": interpret(build_model_graph(spec), {"input_ids": ids}, weights)["logits"]}
    for name in backends:
        backend = get_backend(name)
        graph = run_pipeline(build_model_graph(spec), backend.pipeline)
        assert backend.supports(graph) == (True, ""), name
        got[name] = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights})(ids)["logits"]
    return got


def assert_logits_equal(got: dict, expected, *, atol: float, label: str) -> None:
    """Each of `got`'s logits equals `expected` (transformers') within rtol 1e-5 and `atol`, with the same argmax
    at every position; the max error is printed (pytest -s gives the family x backend table)."""
    for name, logits in got.items():
        print(f"max abs logits error {label} {name}: {float((logits - expected).abs().max()):.2e}")
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=atol, msg=name)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), name


def assert_greedy_equals_generate(hf, spec, weights, prompts, mask, backends, new_tokens: int = 5, **graph_options):
    """Greedy decoding with each backend's decode graph (build_model_graph(form=decode, **graph_options)) gives
    transformers' generate tokens for the (left-padded) prompts, and each step's logits its logits."""
    from moe_ir.backends import get_backend
    from moe_ir.generation import greedy_generate
    from moe_ir.model_builder import GraphForm, build_model_graph
    from moe_ir.passes import run_pipeline

    with torch.no_grad():
        out = hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    theirs = torch.stack(out.logits, dim=1)
    for name in backends:
        backend = get_backend(name)
        decode = run_pipeline(build_model_graph(spec, form=GraphForm.DECODE, **graph_options), backend.pipeline)
        assert backend.supports(decode) == (True, ""), name
        step = backend.prepare(decode, {k: v for k, v in weights.items() if k in decode.weights})
        result = greedy_generate(step, decode, prompts, mask, max_new_tokens=new_tokens)
        assert torch.equal(result.tokens, out.sequences[:, prompts.shape[1]:]), name
        torch.testing.assert_close(result.logits.float(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()),
                                   msg=name)
