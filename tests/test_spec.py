"""The spec: both parametrisations, shipped specs, and that malformed specs only ever raise SpecError."""
import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_ir.analysis import analyse
from moe_ir.errors import SpecError
from moe_ir.frontends import load_spec, load_spec_text
from moe_ir.spec import Activation, ScoreFn, json_schema, spec_from_dict, spec_to_dict

from conftest import SPEC_FILES, SPECS

BASE = {"hidden": 32, "experts": {"routed": 8, "width": 16, "top_k": 2}}


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_shipped_specs_parse_and_name_their_source(path):
    spec = load_spec(path)
    assert spec.source, f"{path.name} must say where its settings come from"
    assert path.read_text().lstrip().startswith("#"), f"{path.name} must open with a comment naming its source"
    # The canonical form parses back to the same spec.
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_paper_form_2b_layer():
    spec = load_spec_text("hidden: 1280\nexperts:\n  paper: {num_experts: 16, expert_width: 5120, "
                          "segmentation: 4, top_k: 2, shared: 1}\n")
    e = spec.experts
    assert (e.routed, e.top_k, e.shared, e.width) == (63, 7, 1, 1280)
    a = analyse(spec)
    assert a.combinations == math.comb(63, 7)
    assert a.paper == {"N": 16, "F": 5120, "m": 4, "K": 2, "Ks": 1}


def test_unsegmented_top2_of_16_has_120_combinations():
    spec = load_spec_text("hidden: 64\nexperts:\n  paper: {num_experts: 16, expert_width: 256, top_k: 2}\n")
    assert analyse(spec).combinations == 120


def test_paper_and_explicit_forms_normalise_to_the_same_spec():
    paper = load_spec_text("hidden: 64\nexperts:\n  paper: {num_experts: 8, expert_width: 64, segmentation: 4, "
                           "top_k: 2, shared: 2}\n")
    explicit = load_spec_text("hidden: 64\nexperts: {routed: 30, shared: 2, width: 16, top_k: 6}\n")
    assert paper.experts.routed == explicit.experts.routed == 30
    assert analyse(paper).total_params == analyse(explicit).total_params


def test_explicit_key_that_disagrees_with_paper_form():
    with pytest.raises(SpecError, match=r"experts.routed: routed=5 disagrees with the paper form, which gives 30"):
        load_spec_text("hidden: 64\nexperts:\n  routed: 5\n  paper: {num_experts: 8, expert_width: 64, "
                       "segmentation: 4, top_k: 2, shared: 2}\n")


@pytest.mark.parametrize("text, path, line, message", [
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 9}\n", "experts.top_k", 2, "exceeds the 8 routed"),
    ("hidden: 32\nexperts:\n  paper: {num_experts: 4, expert_width: 30, segmentation: 4, top_k: 1}\n",
     "experts.paper.segmentation", 3, "must divide"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nrouter:\n  group_limit: {groups: 3, kept: 1}\n",
     "router.group_limit.groups", 4, "must divide"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nrouter:\n  group_limit:\n    groups: 4\n    kept: 5\n",
     "router.group_limit.kept", 6, "exceeds groups"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 6}\nrouter:\n  group_limit: {groups: 4, kept: 2}\n",
     "router.group_limit.kept", 4, "fewer than top_k"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nroutr: {}\n", "routr", 3, "did you mean 'router'"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nrouter: {score: softmx}\n", "router.score", 3,
     "did you mean 'softmax'"),
    ("hidden: -1\nexperts: {routed: 8, width: 16, top_k: 2}\n", "hidden", 1, ">= 1"),
    ("hidden: true\nexperts: {routed: 8, width: 16, top_k: 2}\n", "hidden", 1, "expected an integer"),
    ("experts: {routed: 8, width: 16, top_k: 2}\n", "hidden", 1, "missing required key 'hidden'"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nbalance: {device: {alpha: 0.1, devices: 3}}\n",
     "balance.device.devices", 3, "must divide"),
    ("hidden: 32\nhidden: 16\nexperts: {routed: 8, width: 16, top_k: 2}\n", "hidden", 2, "duplicate key"),
])
def test_spec_errors_name_path_and_line(text, path, line, message):
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "spec.yaml")
    err = info.value
    assert err.path == path
    assert err.line == line
    assert message in str(err)
    assert str(err).startswith(f"spec.yaml:{line}: {path}:")


@pytest.mark.parametrize("text, message", [
    ("!!python/object/apply:os.system ['echo hacked']\n", "YAML tag not allowed"),
    ("hidden: !!python/name:os.system\n", "YAML tag not allowed"),
    ("- 1\n- 2\n", "mapping at the top level"),
    ("", "the spec is empty"),
    ("hidden: [1, 2\n", "YAML error"),
    ("a: b\n---\nc: d\n", "YAML error"),
])
def test_yaml_level_errors(text, message):
    with pytest.raises(SpecError, match=message):
        load_spec_text(text)


def test_missing_file():
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec("/nonexistent/spec.yaml")


def test_defaults_come_from_published_models():
    spec = load_spec_text(yaml.safe_dump(BASE))
    assert spec.experts.activation == Activation.SWIGLU  # DeepSeekMoE, Mixtral, Qwen, OLMoE
    assert spec.router.score == ScoreFn.SOFTMAX
    assert spec.dropless


def test_json_schema_covers_every_section():
    schema = json_schema()
    assert set(schema["properties"]) == {"hidden", "experts", "name", "source", "router", "balance", "capacity",
                                         "dtype", "parallel", "quantization"}
    assert schema["$defs"]["RouterSpec"]["properties"]["score"]["enum"] == ["softmax", "sigmoid"]
    assert schema["$defs"]["GroupLimit"]["required"] == ["groups", "kept"]
    assert schema["additionalProperties"] is False


# -- generated malformed specs: every one must give a SpecError with a key path (or a YAML-level error) --

_KEYS = ["hidden", "experts", "router", "balance", "capacity", "dtype", "name",
         "experts.routed", "experts.width", "experts.top_k", "experts.shared", "experts.activation",
         "experts.paper", "experts.paper.segmentation", "experts.shared_gate", "router.score",
         "router.group_limit", "router.group_limit.groups", "router.group_limit.kept", "router.group_limit.score",
         "router.noise", "router.noise.std", "router.scaling", "router.choice", "router.normalize",
         "balance.device", "balance.device.devices", "balance.aux_free.gamma", "balance.expert",
         "capacity.factor", "capacity.drop", "bogus", "experts.bogus", "router.group_limit.bogus"]
_BAD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                        st.text(max_size=6), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _valid_base() -> dict:
    return {"hidden": 32, "experts": {"routed": 8, "width": 16, "top_k": 2, "shared": 1},
            "router": {"score": "sigmoid", "group_limit": {"groups": 4, "kept": 2, "score": "top2_sum"},
                       "noise": {"std": 1.0}, "normalize": True, "scaling": 2.5},
            "balance": {"expert": 0.01, "device": {"alpha": 0.05, "devices": 2}, "aux_free": {"gamma": 0.001}},
            "capacity": {"factor": 1.5, "drop": "score"}}


def _set(data: dict, path: str, value) -> dict:
    parts = path.split(".")
    cur = data
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return data


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(_KEYS), _BAD_VALUES), min_size=1, max_size=3),
       as_yaml=st.booleans())
def test_malformed_specs_only_raise_spec_errors(edits, as_yaml):
    data = _valid_base()
    for path, value in edits:
        _set(data, path, value)
    try:
        if as_yaml:
            spec = load_spec_text(yaml.safe_dump(data), "gen.yaml")
        else:
            spec = spec_from_dict(data, file="gen")
    except SpecError as err:
        assert str(err).count("\n") == 0, "a spec error is one line"
        assert err.path or err.message.startswith("a spec must be") or "YAML" in err.message
        if as_yaml:
            assert err.line is not None
        return
    # Some edits produce a valid spec; then it must analyse cleanly.
    analyse(spec)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abc:{}[]-!&*#|> \n'\"1")), max_size=40))
def test_random_yaml_text_only_raises_spec_errors(text):
    try:
        load_spec_text(text)
    except SpecError:
        pass


# -- YAML documents that used to escape as other exceptions or hang, and misleading messages --

def _laughs(levels: int) -> str:
    """A "billion laughs" document: each level lists the previous one 9 times, so 9**levels leaves."""
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    names = "abcdefghijkl"[:levels]
    text += "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip(names, names[1:]))
    return text + "hidden: 32\n"


@pytest.mark.parametrize("text, message", [
    ("hidden: &a [*a]\nexperts: {routed: 8, width: 16, top_k: 2}\n", "hidden: expected an integer, found a list"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nsource: " + "[" * 3000 + "]" * 3000 + "\n",
     "nests too deeply"),
    (_laughs(9), "unknown key 'a'"),  # 9**9 list items if the aliases were walked as copies
    ("a: b\n---\nc: d\n", "holds one YAML document"),
])
def test_yaml_aliases_and_nesting_give_spec_errors(text, message):
    with pytest.raises(SpecError, match=message):
        load_spec_text(text)


def test_aliased_nodes_are_walked_once():
    # Small enough that walking aliases as copies (59,049 leaves) fails fast instead of hanging.
    from moe_ir.frontends.yaml_spec import parse_yaml

    _, lines = parse_yaml(_laughs(5))
    assert len(lines) < 100


def test_aliases_still_work_and_errors_at_an_alias_name_its_key():
    spec = load_spec_text("hidden: 32\nexperts:\n  routed: &n 8\n  width: 16\n  top_k: *n\nrouter: {scaling: *n}\n")
    assert (spec.experts.top_k, spec.router.scaling) == (8, 8.0)
    with pytest.raises(SpecError) as info:
        load_spec_text("hidden: &h 32\nexperts:\n  routed: 8\n  width: 16\n  top_k: *h\n")
    assert (info.value.path, info.value.line) == ("experts.top_k", 5)


@pytest.mark.parametrize("text, path, line, message", [
    ("hidden: 32\nexperts:\n  paper: [1, 2]\n", "experts.paper", 3, "expected a mapping, found a list"),
    ("hidden: 32\nexperts:\n  paper: {num_experts: 8, expert_width: 64, segmentation: 4, top_k: 2, shared: 2}\n"
     "  routed: '30'\n", "experts.routed", 4, "expected an integer, found string '30'"),
    ("hidden: 32\nexperts:\n  paper: {num_experts: 8, expert_width: 64, segmentation: 4, top_k: 2, shared: 1}\n"
     "  shared: true\n", "experts.shared", 4, "expected an integer, found boolean true"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\n1: 2\n", "1", 3, "keys must be strings"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nrouter: {choice: expert}\nbalance: {switch: 0.01}\n",
     "balance.switch", 4, "needs token-choice"),
    ("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nrouter: {choice: expert}\n"
     "balance:\n  z_loss: 0.001\n  sequence: 0.001\n", "balance.sequence", 6, "needs token-choice"),
    ("name: ../../out/x\nhidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\n", "name", 1, "does not match"),
    ("name: 'a\"\"\"b'\nhidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\n", "name", 1, "does not match"),
    ("model: {vocab_size: 8}\nmoe: {experts: {routed: 8, width: 16, top_k: 2}}\n", "model", 1, "this is a model spec"),
])
def test_more_spec_errors_name_path_and_line(text, path, line, message):
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "spec.yaml")
    assert (info.value.path, info.value.line) == (path, line)
    assert message in str(info.value) and str(info.value).startswith(f"spec.yaml:{line}: {path}:")


def test_expert_choice_keeps_the_z_loss():
    spec = load_spec_text("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nrouter: {choice: expert}\n"
                          "balance: {z_loss: 0.001}\n")
    assert spec.balance.losses == {"z_loss": 0.001}


def test_json_schema_accepts_shipped_specs_and_rejects_what_the_parser_rejects():
    import jsonschema  # the `test` extra installs it
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in SPEC_FILES:
        data = yaml.safe_load(path.read_text())
        assert not list(validator.iter_errors(data)), path.name
    for bad in ({**BASE, "routr": {}}, {**BASE, "hidden": "32"}, {**BASE, "name": "a/b"},
                {**BASE, "router": {"score": "softmx"}}, {"hidden": 32, "experts": {"width": 16}}):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(SpecError):
            spec_from_dict(bad)


def test_exponent_floats_read_as_numbers():
    """`1e-3` is a string under PyYAML's YAML 1.1 rules; specs read it as YAML 1.2 does."""
    spec = load_spec_text("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\n"
                          "balance: {aux_free: {gamma: 1e-3}, z_loss: 2.5E-4, expert: .5e-2}\nrouter: {scaling: 25e-1}\n")
    assert (spec.balance.aux_free.gamma, spec.balance.z_loss, spec.balance.expert) == (1e-3, 2.5e-4, 5e-3)
    assert spec.router.scaling == 2.5
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}  # the global SafeLoader is left alone
    with pytest.raises(SpecError, match="hidden: expected an integer, found number 1000.0"):
        load_spec_text("hidden: 1e3\nexperts: {routed: 8, width: 16, top_k: 2}\n")
    with pytest.raises(SpecError, match="name: expected a string, found number 100.0"):
        load_spec_text("name: 1e2\nhidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\n")


def test_key_with_a_newline_still_gives_a_one_line_error():
    # found by the hypothesis test above: a key quoted in the message used to split it over lines
    with pytest.raises(SpecError) as info:
        spec_from_dict({"name": "x", "hidden": 8, "experts": {"routed": 4, "width": 4, "top_k": 1, "\n": 0}})
    assert "\n" not in str(info.value) and "unknown key '\\n'" in str(info.value)


def test_spec_hash_is_canonical():
    """Both parametrisations of one layer hash the same; name and source do not count; anything that changes
    the computation does (the hash gates TensorRT engines and weight files)."""
    from moe_ir.builder import spec_hash
    from moe_ir.model_builder import model_spec_hash
    from moe_ir.frontends import load_model_spec, load_spec_text

    paper = load_spec_text("name: a\nhidden: 64\nexperts: {paper: {num_experts: 16, expert_width: 128, "
                           "segmentation: 4, top_k: 2, shared: 2}}\n")
    explicit = load_spec_text("name: b\nsource: another note\nhidden: 64\n"
                              "experts: {routed: 62, width: 32, top_k: 6, shared: 2}\n")
    assert spec_hash(paper) == spec_hash(explicit)
    for change in ("experts: {routed: 62, width: 32, top_k: 5, shared: 2}",
                   "experts: {routed: 62, width: 32, top_k: 6, shared: 2}\nrouter: {score: sigmoid}",
                   "experts: {routed: 62, width: 32, top_k: 6, shared: 2}\ncapacity: {factor: 1.25}",
                   "experts: {routed: 62, width: 32, top_k: 6, shared: 2}\ndtype: bfloat16"):
        assert spec_hash(load_spec_text(f"name: b\nhidden: 64\n{change}\n")) != spec_hash(explicit), change
    model = load_model_spec(SPECS / "models" / "mixtral-8x7b.yaml")
    renamed = dataclasses.replace(model, model=dataclasses.replace(model.model, name="other", source="x"))
    assert model_spec_hash(renamed) == model_spec_hash(model)
    wider = dataclasses.replace(model, model=dataclasses.replace(model.model, vocab_size=model.model.vocab_size + 1))
    assert model_spec_hash(wider) != model_spec_hash(model)
