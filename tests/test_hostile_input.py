"""Hostile and careless input over the command line (issue 16, Robustness 5, 6, 8, 9).

The property tests feed the CLI surfaces (spec files, Hugging Face configs, weight files, command-line
values) with inputs built to break them, and assert what every failure must look like: exit code 0, 1 or 2,
one line on stderr, no traceback and no "internal error", within a per-call time limit. They run `main()` in
this process (a subprocess only for Ctrl-C). Then one regression test per class of defect the adversarial
pass found: unbounded sizes, tracebacks, bad input accepted silently, a backend exception escaping the
validation harness (and torch.compile's recompile limit).

`pytest tests/test_hostile_input.py --hypothesis-show-statistics` prints how many examples each property ran.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from moe_ir import cli
from moe_ir.cli import main
from moe_ir.frontends import load_spec
from moe_ir.params import init_weights

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "specs" / "tiny.yaml"

TINY_LAYER = {"name": "tiny", "hidden": 32,
              "experts": {"routed": 6, "shared": 1, "width": 16, "top_k": 2},
              "router": {"score": "softmax"}, "balance": {"expert": 0.01}}
TINY_MODEL = {"model": {"name": "m", "vocab_size": 64, "hidden": 32, "layers": 2, "first_dense": 1,
                        "dense_width": 64, "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2}},
              "moe": {"experts": {"routed": 4, "width": 16, "top_k": 2}}}
HF_CONFIG = {"model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
             "num_hidden_layers": 3, "num_attention_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1,
             "num_experts_per_tok": 2, "first_k_dense_replace": 1, "norm_topk_prob": True,
             "routed_scaling_factor": 2.5, "n_group": 2, "topk_group": 1, "hidden_act": "silu", "vocab_size": 128,
             "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "torch_dtype": "float32"}

CALL_SECONDS = 20.0  # per call: generous for a loaded 2-core machine; a hang or a minutes-long parse fails it
PROPERTY = settings(deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CallTimeout(BaseException):
    """Raised by the timer inside a call that ran too long (a BaseException: main() must not catch it)."""


def run_cli(argv: list[str], seconds: float = CALL_SECONDS) -> tuple[int, str, str, float]:
    """main(argv) in this process: (exit code, stdout, stderr, seconds); argparse's exits count as codes."""
    out, err = io.StringIO(), io.StringIO()

    def expire(signum, frame):
        raise CallTimeout(f"moe-ir {' '.join(argv)[:200]} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def assert_clean(argv: list[str], code: int, err: str) -> None:
    """What every outcome must look like: a documented exit code and errors as lines, never a traceback."""
    with contextlib.suppress(InvalidArgument):  # outside a property there is nothing to record
        event(f"exit {code}")  # --hypothesis-show-statistics: how the examples ended
    where = f"moe-ir {' '.join(map(str, argv))[:300]}\n{err[-2000:]}"
    assert code in (0, 1, 2), f"exit {code}: {where}"
    assert "Traceback" not in err, where
    assert "internal error" not in err, where
    if code != 0:
        assert err.strip(), f"failed without a message: {where}"
        errors = [line for line in err.splitlines() if "error" in line]
        assert errors, where


# ----------------------------------------------------------------------------------------------
# strategies

huge_ints = st.one_of(st.integers(min_value=2**31, max_value=10**400), st.integers(max_value=-1, min_value=-10**400))
hostile_values = st.one_of(
    st.integers(min_value=-3, max_value=70), huge_ints, st.just(10**1000), st.just(1_000_000_000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.booleans(), st.none(),
    st.lists(st.integers(min_value=-2, max_value=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(min_value=0, max_value=3), max_size=2),
    st.sampled_from(["softmax", "sigmoid", "swiglu", "mla", "gqa", "mha", "float16", "bfloat16", "../../x", "/x/y"]),
)

# Raw documents no mutation of a valid spec produces: tags, bombs, deep nesting, huge literals, bad bytes.
RAW_SPECS = [
    b"hidden: !!int abc\n", b"hidden: !!timestamp abc\n", b"hidden: !!float nope\n", b"hidden: !!binary '%%'\n",
    b"hidden: !!python/object/apply:os.system ['true']\n", b"hidden: !!set {a, b}\n", b"!!omap [a: 1]\n",
    b"hidden: " + b"9" * 5000 + b"\n", b"hidden: -" + b"9" * 4000 + b"\n", b"hidden: 1e999999\n",
    b"a: &a [1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
    b"d: [*c, *c, *c, *c, *c, *c, *c, *c]\n",
    b"[" * 5000 + b"]" * 5000, b"{a: " * 3000 + b"1" + b"}" * 3000, b"a: [" + b"1," * 30000 + b"1]\n",
    b"x: 1\n---\ny: 2\n", b"\xff\xfe\x00h\x00", b"", b"\x00\x00\x00", b"hidden: 32\nhidden: 64\n", b"- 1\n- 2\n",
    b"model: {layers: 1000000000}\nmoe: {}\n", b"model: [1]\nmoe: 1\n",
]


def _leaf_paths(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield prefix + (key,)
            yield from _leaf_paths(value, prefix + (key,))


def _set(data, path, value):
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@st.composite
def mutated(draw, base):
    """`base` with one to three entries replaced by hostile values (or a key added)."""
    data = base
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = list(_leaf_paths(data))
        path = draw(st.sampled_from(paths))
        if draw(st.booleans()) and isinstance(draw(st.just(data)), dict):
            path = path[:-1] + (draw(st.sampled_from(["extra", "hidden", "layers", "kv_heads", "name", "paper"])),)
        try:
            data = _set(data, path, draw(hostile_values))
        except (TypeError, KeyError):  # the parent became a scalar in an earlier step
            pass
    return data


def _yaml_bytes(data) -> bytes:
    try:
        return yaml.safe_dump(data, sort_keys=False).encode()
    except ValueError:  # an integer of more digits than Python prints
        return b"hidden: " + b"7" * 4400 + b"\n"


spec_documents = st.one_of(
    mutated(TINY_LAYER).map(_yaml_bytes), mutated(TINY_MODEL).map(_yaml_bytes), st.sampled_from(RAW_SPECS),
    st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="moe-ir-hostile-"))


# ----------------------------------------------------------------------------------------------
# properties over the CLI surfaces


@settings(PROPERTY, max_examples=300)
@given(document=spec_documents, command=st.sampled_from(["inspect", "inspect-json", "graph", "backends"]))
def test_any_spec_file_is_read_or_refused_in_one_line(document, command):
    folder = _scratch()
    try:
        path = folder / "spec.yaml"
        path.write_bytes(document)
        argv = {"inspect": ["inspect", path], "inspect-json": ["inspect", path, "--json"],
                "graph": ["graph", path, "--format", "json"], "backends": ["backends", path, "--json"]}[command]
        code, _, err, _ = run_cli(argv)
        assert_clean(argv, code, err)
    finally:
        shutil.rmtree(folder)


hf_documents = st.one_of(
    mutated(HF_CONFIG).map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"[" * 100000 + b"]" * 100000, b'{"model_type": "olmoe", "hidden_size": ' + b"9" * 5000 + b"}",
                     b'{"model_type": "olmoe", "num_hidden_layers": 1000000000000}', b"", b"nul\x00", b"[]", b"1e999",
                     json.dumps({**HF_CONFIG, "rope_parameters": {"rope_theta": "abc"}}).encode(),
                     json.dumps({**HF_CONFIG, "rope_parameters": [1]}).encode(),
                     json.dumps({**HF_CONFIG, "num_hidden_layers": 10**12}).encode(),
                     json.dumps({**HF_CONFIG, "model_type": "olmoe", "num_key_value_heads": 0}).encode()]),
    st.binary(max_size=100),
)


@settings(PROPERTY, max_examples=200)
@given(document=hf_documents, whole_model=st.booleans())
def test_any_hf_config_is_imported_or_refused_in_one_line(document, whole_model):
    folder = _scratch()
    try:
        path = folder / "config.json"
        path.write_bytes(document)
        argv = ["import-hf", path] + (["--model"] if whole_model else [])
        code, _, err, _ = run_cli(argv)
        assert_clean(argv, code, err)
    finally:
        shutil.rmtree(folder)


TINY_WEIGHTS = init_weights(cli.spec_graph(load_spec(TINY)), 0)
WEIGHT_DTYPES = [torch.int8, torch.uint8, torch.bool, torch.int64, torch.int32, torch.float16, torch.bfloat16,
                 torch.float64, torch.float32]


@st.composite
def weight_files(draw) -> bytes | dict:
    """Tensors for specs/tiny.yaml with one to three defects, or bytes that are not a safetensors file."""
    if draw(st.integers(min_value=0, max_value=5)) == 0:
        header = draw(st.sampled_from([b"", b"\x00" * 7, (10**12).to_bytes(8, "little") + b"{}",
                                       (40).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [1000000000]}}',
                                       (2).to_bytes(8, "little") + b"{}"]))
        return header + draw(st.binary(max_size=64))
    tensors = {k: v.clone() for k, v in TINY_WEIGHTS.items()}
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        name = draw(st.sampled_from(sorted(tensors)))
        defect = draw(st.sampled_from(["dtype", "value", "shape", "drop", "extra"]))
        if defect == "dtype":
            tensors[name] = tensors[name].to(draw(st.sampled_from(WEIGHT_DTYPES)))
        elif defect == "value" and tensors[name].is_floating_point() and tensors[name].numel():
            flat = tensors[name].reshape(-1).clone()
            flat[draw(st.integers(min_value=0, max_value=flat.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]))
            tensors[name] = flat.reshape(tensors[name].shape)
        elif defect == "shape":
            tensors[name] = torch.zeros(*[d + 1 for d in tensors[name].shape])
        elif defect == "drop" and len(tensors) > 1:
            del tensors[name]
        elif defect == "extra":
            tensors["extra.weight"] = torch.zeros(2)
    return tensors


@settings(PROPERTY, max_examples=100)
@given(weights=weight_files())
def test_any_weight_file_is_used_or_refused_naming_the_problem(weights):
    from safetensors.torch import save_file

    folder = _scratch()
    try:
        path = folder / "w.safetensors"
        if isinstance(weights, bytes):
            path.write_bytes(weights)
        else:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
        argv = ["validate", TINY, "--backends", "reference", "--tokens", "3", "--weights", path]
        code, _, err, _ = run_cli(argv)
        assert_clean(argv, code, err)
    finally:
        shutil.rmtree(folder)


numbers = st.one_of(st.integers(min_value=-10**30, max_value=10**30).map(str), st.sampled_from(
    ["", "-0", "1e3", "0x10", "nan", "1" * 5000, " 7", "1_000", "\x00", "--json", "99999999999999999999999"]))
small_runs = st.integers(min_value=1, max_value=24).map(str)
too_large_runs = st.integers(min_value=10**9, max_value=10**30).map(str)


def _not_a_long_run(text: str) -> bool:
    """Leaves out token counts that are valid and fit in memory but take long to run (not hostile, just slow)."""
    try:
        return not 24 < int(text) < 10**9
    except ValueError:
        return True
backend_lists = st.lists(st.sampled_from([",", "", ":", "torch:", "onnx:nope", "nope", "reference", "reference,,",
                                          "REFERENCE", "reference:1", " reference"]), min_size=1, max_size=3)


@st.composite
def command_lines(draw) -> list[str]:
    kind = draw(st.sampled_from(["context", "tokens", "batch", "seed", "shrink", "backends", "dtype"]))
    if kind == "context":
        return ["inspect", REPO / "specs" / "models" / "mixtral-8x7b.yaml", "--context", draw(numbers)]
    base = ["validate", TINY, "--tokens", "4"]
    if kind in ("tokens", "batch"):
        value = draw(st.one_of(numbers.filter(_not_a_long_run), small_runs, too_large_runs))
        return base + ["--backends", "reference", f"--{kind}", value]
    if kind == "seed":
        return base + ["--backends", "reference", "--seed", draw(numbers)]
    if kind == "shrink":
        return base + ["--backends", "reference", "--shrink", draw(st.one_of(numbers, st.sampled_from(["2", "64"])))]
    if kind == "dtype":
        return base + ["--backends", "reference", "--dtype", draw(st.sampled_from(["float16", "int8", "", "float64"]))]
    return base + ["--backends", *draw(backend_lists)]


@settings(PROPERTY, max_examples=120)
@given(argv=command_lines())
def test_any_command_line_value_runs_or_is_refused_in_one_line(argv):
    code, _, err, _ = run_cli(argv)
    assert_clean(argv, code, err)


# ----------------------------------------------------------------------------------------------
# class 5: sizes are bounded where they are read and before anything is allocated


def test_huge_sizes_are_refused_at_once_with_the_limit(tmp_path):
    layers = tmp_path / "layers.yaml"
    layers.write_text(yaml.safe_dump(_set(TINY_MODEL, ("model", "layers"), 1_000_000_000)))
    for argv in (["inspect", layers], ["backends", layers]):
        code, _, err, seconds = run_cli(argv)
        assert code == 2 and "model.layers" in err and "1,024" in err and "1,000,000,000" in err, err
        assert seconds < 1.0, f"{argv[0]} took {seconds:.2f} s to refuse"
    flow = tmp_path / "flow.yaml"
    flow.write_bytes(b"a: [" + b"1," * (12 * 2**20) + b"1]\n")  # 25 MB flow sequence
    code, _, err, seconds = run_cli(["inspect", flow])
    assert code == 2 and "larger than 64 KiB" in err and seconds < 1.0, (err, seconds)
    digits = tmp_path / "digits.yaml"
    digits.write_text("hidden: " + "9" * 5000 + "\n")
    code, _, err, _ = run_cli(["inspect", digits])
    assert code == 2 and "digits.yaml:1" in err and "!!int" in err, err


def test_huge_hf_config_values_are_refused_by_key(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**HF_CONFIG, "num_hidden_layers": 10**12}))
    code, _, err, seconds = run_cli(["import-hf", config])
    assert code == 2 and "num_hidden_layers" in err and "1,000,000,000,000" in err and seconds < 1.0, err
    config.write_text('{"model_type": "olmoe", "hidden_size": ' + "9" * 5000 + "}")
    code, _, err, _ = run_cli(["import-hf", config])
    assert code == 2 and "cannot read the config" in err, err


def test_run_sizes_are_covered_by_the_memory_check():
    code, _, err, seconds = run_cli(["validate", TINY, "--backends", "reference", "--tokens", "1000000000"])
    assert code == 1 and "inputs and activations of 1 x 1000000000 tokens" in err and "GiB" in err, err
    code, _, err, _ = run_cli(["validate", TINY, "--backends", "reference", "--batch", "100000000"])
    assert code == 1 and "100000000 x 16 tokens" in err, err
    assert seconds < 5.0


# ----------------------------------------------------------------------------------------------
# class 6: one error boundary; causes fixed where they arise


def test_unexpected_exceptions_are_one_line_internal_errors(monkeypatch):
    def broken(args):
        raise ValueError("a bug\nwith two lines")

    monkeypatch.setattr(cli, "_cmd_schema", broken)
    code, _, err, _ = run_cli(["schema"])
    assert code == 1 and err == ("moe-ir: internal error: ValueError: a bug with two lines "
                                 "(rerun with --debug for the traceback)\n"), err
    with pytest.raises(ValueError, match="a bug"):
        main(["--debug", "schema"])
    with pytest.raises(ValueError, match="a bug"):
        main(["schema", "--debug"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_schema", interrupted)
    code, _, err, _ = run_cli(["schema"])
    assert code == 130 and "Traceback" not in err and len(err.splitlines()) <= 1


def test_ctrl_c_at_any_moment_exits_130_without_a_traceback():
    # Before main(): the console script has imported moe_ir.cli and main() has not started yet.
    before_main = ("import os, signal, sys, time; sys.argv[0] = 'moe-ir'; import moe_ir.cli; "
                   "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", before_main], capture_output=True, timeout=60, cwd=REPO)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, b"", b"")
    # What the console script runs, plus a line once the package itself is imported: a Ctrl-C before that is
    # Python's own start-up or `import moe_ir` (a few ms idle, more on a loaded machine), before any handler
    # can exist. The delays land in importing the CLI, building the parser, importing torch inside main(), and
    # in the run.
    script = ("import sys; sys.argv[0] = 'moe-ir'; import moe_ir; print('ready', file=sys.stderr, flush=True); "
              "from moe_ir.cli import main; sys.exit(main())")
    command = [sys.executable, "-c", script, "validate", str(TINY), "--backends", "reference", "torch"]
    outcomes = []
    for delay in (0.03, 0.1, 0.3, 0.8):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        assert proc.stderr.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        outcomes.append(proc.returncode)
        assert "Traceback" not in err.decode(), (delay, err.decode())
        assert proc.returncode in (130, 0), (delay, proc.returncode, err.decode())
        if proc.returncode == 130:  # progress lines, then one line saying so
            assert err.decode().splitlines()[-1:] in ([], ["moe-ir: interrupted"]), err.decode()
    assert outcomes.count(130) >= 3, outcomes


@pytest.mark.parametrize("text, fragment", [
    ("hidden: !!int abc\n", "not a valid !!int value"),
    ("hidden: !!timestamp abc\n", "not a valid !!timestamp value"),
    ("hidden: !!timestamp 2001-01-01\nexperts: {routed: 4, width: 4, top_k: 1}\n", "found date"),
])
def test_yaml_tags_are_spec_errors_at_their_line(tmp_path, text, fragment):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    code, _, err, _ = run_cli(["inspect", path])
    assert code == 2 and f"{path}:1" in err and fragment in err, err


def test_deep_json_and_bad_rope_parameters_are_spec_errors(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("[" * 100000 + "]" * 100000)
    code, _, err, _ = run_cli(["import-hf", config])
    assert code == 2 and "nests too deeply" in err, err
    config.write_text(json.dumps({**HF_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": "abc"}}))
    code, _, err, _ = run_cli(["import-hf", config, "--model"])
    assert code == 2 and "rope_parameters.rope_theta" in err and "'abc'" in err, err


def test_malformed_weight_map_is_a_weights_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    for weight_map in ([1, 2], {"a": 1}, "x", None):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        argv = ["import-hf", tmp_path, "--weights", tmp_path, "--weights-out", tmp_path / "w.safetensors"]
        code, _, err, _ = run_cli(argv)
        assert_clean(argv, code, err)
        assert code == 1 and "weight_map" in err, err


def test_huge_seed_is_a_usage_error():
    code, _, err, _ = run_cli(["validate", TINY, "--backends", "reference", "--seed", str(2**64)])
    assert code == 2 and "--seed" in err, err


# ----------------------------------------------------------------------------------------------
# class 8: bad input is refused (or, for a lossless widening, converted with a note), never taken silently


def _weights_file(tmp_path, **changes) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.clone() for k, v in TINY_WEIGHTS.items()}
    tensors.update(changes)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


def test_non_finite_and_non_float_weights_are_refused_naming_the_tensor(tmp_path):
    name = "experts.w_up"
    poisoned = TINY_WEIGHTS[name].clone()
    poisoned[1, 2, 3] = float("nan")
    poisoned[0, 0, 0] = float("inf")
    for tensor, fragment in ((poisoned, "2 non-finite value(s) (inf, nan)"),
                             (TINY_WEIGHTS[name].to(torch.int8), "has dtype int8"),
                             (TINY_WEIGHTS[name] > 0, "has dtype bool")):
        path = _weights_file(tmp_path, **{name: tensor})
        for argv in (["validate", TINY, "--backends", "reference", "--weights", path],
                     ["build", TINY, "--backend", "torch", "--weights", path, "-o", tmp_path / "out"]):
            code, _, err, _ = run_cli(argv)
            assert code == 1 and f"tensor {name} " in err and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_half_precision_weights_under_a_float32_spec_are_converted_exactly_with_a_note(tmp_path):
    # Widening float16 -> float32 keeps every value, so it is done (and said); narrowing would not, so it is refused.
    half = {k: v.half() for k, v in TINY_WEIGHTS.items()}
    path = _weights_file(tmp_path, **half)
    code, out, err, _ = run_cli(["validate", TINY, "--backends", "reference", "--weights", path])
    assert code == 0 and "stored as float16 converted to the graph's float32 (exactly)" in err, err
    doubled = TINY_WEIGHTS["experts.w_up"].double()
    code, _, err, _ = run_cli(["build", TINY, "--backend", "torch", "--weights", _weights_file(tmp_path, **{
        "experts.w_up": doubled}), "-o", tmp_path / "out"])
    assert code == 1 and "would lose precision" in err and "experts.w_up (float64)" in err, err


def test_zero_kv_heads_is_refused(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**HF_CONFIG, "model_type": "olmoe", "num_experts": 8, "intermediate_size": 32,
                                  "num_key_value_heads": 0}))
    code, _, err, _ = run_cli(["import-hf", config, "--model"])
    assert code == 2 and "num_key_value_heads" in err and "found 0" in err, err


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", REPO / "specs" / "models" / "mixtral-8x7b.yaml", "--context", "-5000"], "--context"),
    (["validate", TINY, "--backends", ","], "names no backend"),
    (["validate", TINY, "--backends", "nope"], "unknown backend(s) 'nope'"),
    (["validate", TINY, "--backends", "onnx:nope"], "nope"),
    (["validate", TINY, "--tokens", "0"], "--tokens"),
])
def test_bad_command_line_values_are_usage_errors(argv, fragment):
    code, _, err, _ = run_cli(argv)
    assert code == 2 and fragment in err, err


# ----------------------------------------------------------------------------------------------
# class 9: a backend's exception is its row; compiled specs do not share dynamo's cache


def test_a_backend_exception_is_that_backends_error_row():
    from moe_ir.backends import get_backend
    from moe_ir.validate import validate

    class Exploding(type(get_backend("reference"))):
        name = "exploding"

        def prepare(self, graph, weights, **options):
            raise RuntimeError("FailOnRecompileLimitHit: recompile_limit reached\nsecond line")

    report = validate(load_spec(TINY), [Exploding(), get_backend("reference")], tokens=4)
    rows = {r.backend: r for r in report.results}
    assert rows["exploding"].status == "error" and not report.ok
    assert rows["exploding"].reason == "RuntimeError: FailOnRecompileLimitHit: recompile_limit reached"
    assert rows["reference"].status == "ok"


def test_compiled_runners_do_not_share_dynamos_recompile_budget(monkeypatch):
    """Nine different specs compiled in one process each get a compiled function of their own: with the
    limit lowered to one compile per function, every one of them still runs without a recompile error."""
    import torch._dynamo

    from moe_ir.backends.compile import CompiledRunner
    from moe_ir.backends.torch_eager.backend import lower
    from moe_ir.passes import run_pipeline
    from moe_ir.spec import spec_from_dict

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    for i in range(9):
        spec = spec_from_dict(_set(_set(TINY_LAYER, ("experts", "routed"), 4 + i), ("hidden", ), 8 + 2 * i))
        graph = run_pipeline(cli.spec_graph(spec), ("dce",))
        weights = init_weights(graph, i)
        runner = CompiledRunner(lower(graph, weights), compiler="eager")  # dynamo's tracing without inductor
        x = torch.randn(1, 5, spec.hidden)
        with torch.no_grad():
            torch.testing.assert_close(runner(x)["out"], lower(graph, weights)(x).out)
