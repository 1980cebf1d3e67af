"""Outputs (issue 16: Security 1, Robustness 7, and Robustness 6's output locations): every file a command
writes lands inside the folder or the paths it was given, complete and consistent, or nothing changes.

The mechanism is moe_ir.artifacts (staging folder, plain-name check, swap with rollback); these tests drive
it through every backend that builds here and through import-hf, with hostile names, faults injected at
every rename of a build (a full disk, Ctrl-C), and bad output locations; a hypothesis property test then
draws locations, names and faults together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from moe_ir.artifacts import STAGE_PREFIX, OutputFiles, OutputFolder, check_file_name
from moe_ir.backends import get_backend
from moe_ir.cli import main, prepare_for_backend
from moe_ir.errors import MoeIRError, OutputError, UsageError
from moe_ir.frontends.yaml_spec import load_any

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "specs" / "tiny.yaml"
# A two-layer decoder small enough to build in well under a second on every fast backend.
TINY_MODEL = ("model:\n  name: {name}\n  vocab_size: 37\n  hidden: 16\n  layers: 2\n"
              "  attention: {{kind: gqa, heads: 2, kv_heads: 1}}\nmoe:\n  experts: {{routed: 4, width: 8, top_k: 2}}\n")
FAST_BACKENDS = ("torch", "onnx:portable", "onnx:ort", "onnx:plugin")
REAL_REPLACE = os.replace


# ------------------------------------------------------------------------------------------------
# helpers


def tree(root: Path) -> dict[str, tuple]:
    """Everything under `root` by relative path: folders, files with their bytes and mode, links with their
    target (not followed). Two equal trees are byte-identical."""
    out: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return out
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
    return out


def leftovers(root: Path) -> list[str]:
    """Staging folders (or their contents) anywhere under `root`."""
    return [f for f in tree(root) if STAGE_PREFIX in f or f.split(os.sep)[-1].startswith(".old-")]


def run_cli(*argv: object) -> tuple[int, str, str]:
    """`moe-ir ARGV` in this process (the error boundary of main() included): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> bool:
    """stderr ends in exactly one `moe-ir: ...` line (progress lines before it are fine) and holds no traceback."""
    lines = err.splitlines()
    return bool(lines) and [ln for ln in lines if ln.startswith("moe-ir:")] == [lines[-1]] and "Traceback" not in err


def graph_and_weights(spec, backend, seed: int = 0):
    return prepare_for_backend(spec, backend, seed=seed)


def model_spec_file(folder: Path, name: str) -> Path:
    path = folder / "tiny-model.yaml"
    path.write_text(TINY_MODEL.format(name=json.dumps(name)))
    return path


def renamed(spec, name: str):
    """The spec with another name, past the parser's pattern: what the writer must confine on its own."""
    if hasattr(spec, "model"):
        return dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=name))
    return dataclasses.replace(spec, name=name)


class FailAt:
    """os.replace that raises `error` on its `at`-th call (every later call works, so rollbacks can run),
    counting calls; at=0 never fails."""

    def __init__(self, at: int, error: BaseException):
        self.at, self.error, self.calls = at, error, 0

    def __call__(self, src, dst, **kw):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return REAL_REPLACE(src, dst, **kw)


def enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path is not None else []))


# ------------------------------------------------------------------------------------------------
# the writer itself


@pytest.mark.parametrize("name, problem", [
    ("../x", "folder part"), ("a/b", "folder part"), ("/etc/passwd", "absolute"), ("..", "names a folder"),
    (".", "names a folder"), ("", "empty"), ("a\\b", "folder part"), ("a\nb", "control character"),
    (".moe-ir-stage-x", "writer's own"), ("x" * 256, "longer than 255"), (None, "not a string"),
])
def test_file_names_outside_the_folder_are_refused(name, problem):
    with pytest.raises(OutputError, match=problem):
        check_file_name(name, "test")


@pytest.mark.parametrize("name", ["model.py", "tiny.portable.onnx.data", "a-b_c.d", "x" * 255, ".hidden"])
def test_plain_file_names_pass(name):
    assert check_file_name(name, "test") == name


def test_a_link_at_the_destination_is_replaced_not_followed(tmp_path):
    """OUT/name being a link to a file elsewhere: the build replaces the link; the file it pointed at is
    untouched (a write through it would escape OUT)."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").symlink_to(outside)
    with OutputFolder(out) as folder:
        folder.path("a.txt").write_text("new")
    assert outside.read_text() == "keep me"
    assert not (out / "a.txt").is_symlink() and (out / "a.txt").read_text() == "new"


def test_a_staged_link_is_not_committed(tmp_path):
    """Only regular files move in: a link written into the staging folder (pointing anywhere) is refused."""
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="was not written"):
        with OutputFolder(out) as folder:
            os.symlink("/etc/passwd", folder.path("a.txt"))
    assert not out.exists() and not os.path.lexists(tmp_path / "a.txt")


def test_claimed_names_not_written_are_removed_and_others_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.data").write_text("stale")
    (out / "mine.txt").write_text("unrelated")
    with OutputFolder(out) as folder:
        folder.path("new.bin").write_bytes(b"1")
        folder.claim("old.data")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "new.bin"]


def test_output_files_refuse_the_same_path_twice(tmp_path):
    with pytest.raises(UsageError, match="also another output"):
        with OutputFiles("test") as out:
            out.path(tmp_path / "a.yaml")
            out.path(tmp_path / "." / "a.yaml")
    assert list(tmp_path.iterdir()) == []


def test_held_interrupt_arrives_after_a_complete_commit(tmp_path):
    """Ctrl-C during the swap waits for the last rename: the folder is then wholly new, never mixed."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a", "b", "c"):
        (out / name).write_text("old")
    fired = []

    def replace_with_signal(src, dst, **kw):
        if Path(dst).parent == out and not fired:
            fired.append(dst)
            signal.raise_signal(signal.SIGINT)
        return REAL_REPLACE(src, dst, **kw)

    with mock.patch.object(os, "replace", replace_with_signal), pytest.raises(KeyboardInterrupt):
        with OutputFolder(out) as folder:
            for name in ("a", "b", "c"):
                folder.path(name).write_text("new")
    assert fired and {p.name: p.read_text() for p in out.iterdir()} == {"a": "new", "b": "new", "c": "new"}


# ------------------------------------------------------------------------------------------------
# Security 1: no spec field writes outside -o


HOSTILE_NAMES = ["../escape", "../../escape", "sub/../../escape", "..", "a/b", "", "x\ny"]


@pytest.mark.parametrize("kind", ["layer", "model"])
@pytest.mark.parametrize("name", HOSTILE_NAMES + ["/ABS/escape", "x" * 129, ".hidden", "-dash"])
def test_spec_names_with_a_path_are_refused_by_the_parser(tmp_path, kind, name):
    name = name.replace("/ABS", str(tmp_path))
    if kind == "layer":
        spec_file = tmp_path / "layer.yaml"
        spec_file.write_text(TINY.read_text().replace("name: tiny", f"name: {json.dumps(name)}"))
    else:
        spec_file = model_spec_file(tmp_path, name)
    before = tree(tmp_path)
    code, _, err = run_cli("build", spec_file, "--backend", "onnx", "-o", tmp_path / "out")
    assert code == 2, err
    assert "name" in err and "does not match" in err and err.count("\n") == 1
    assert tree(tmp_path) == before


BUILDING_BACKENDS = FAST_BACKENDS + ("tensorrt", "aoti")


# Names that stay plain file names once suffixed ('..' -> '...pt2') would compile a real package for aoti: one
# real aoti build is test_aoti_build_goes_through_the_writer's.
@pytest.mark.parametrize("backend_label, name", [
    (backend, name) for backend in BUILDING_BACKENDS for name in ["/ABS/escape"] + HOSTILE_NAMES
    if backend != "aoti" or name not in ("..", "")])
def test_the_writer_confines_names_the_parser_never_saw(tmp_path, backend_label, name):
    """Defence in depth: a spec object whose name holds a path (built in code, past the parser) cannot make
    any backend write outside its output folder."""
    root = tmp_path / "root"
    root.mkdir()
    name = name.replace("/ABS", str(root))
    backend = get_backend(backend_label)
    spec = load_any(TINY)
    graph, weights = graph_and_weights(spec, backend)
    out = root / "out"
    try:
        result = backend.build(renamed(spec, name), graph, weights, out)
    except OutputError as err:
        assert "refusing to write the file" in str(err)
        assert backend_label != "torch"  # the torch backend's file names do not come from the spec
        assert tree(root) == {}  # not even the output folder was left behind
        return
    except MoeIRError as err:  # tensorrt without TensorRT: the bundle is committed, then the build stops
        assert backend_label == "tensorrt" and "TensorRT" in str(err)
        result = None
    # A name that is still one plain file name once suffixed ('..' -> '...portable.onnx'): inside OUT.
    assert tree(root) and all(path == "out" or path.startswith("out/") for path in tree(root))
    if result is not None:
        assert all(p.parent == out and p.is_file() for p in result.files)


@pytest.mark.parametrize("backend_label", ["torch", "onnx:portable"])
def test_a_model_spec_name_cannot_leave_the_folder_either(tmp_path, backend_label):
    """The issue's example: a model spec's name joined to OUT by the ONNX backend."""
    root = tmp_path / "root"
    root.mkdir()
    spec = load_any(model_spec_file(tmp_path, "tm"))
    backend = get_backend(backend_label)
    graph, weights = graph_and_weights(spec, backend)
    for name in (f"{root}/escape", "../../escape"):
        try:
            backend.build(renamed(spec, name), graph, weights, root / "out")
        except OutputError:
            assert backend_label != "torch"
    assert all(path == "out" or path.startswith("out/") for path in tree(root))
    assert not list(tmp_path.glob("escape*")) and not list(root.glob("escape*"))


# ------------------------------------------------------------------------------------------------
# Robustness 7: a failure anywhere leaves the previous build byte-identical


def _previous_build(backend_label: str, root: Path, **options) -> tuple[Path, object, dict]:
    """OUT with a build of the tiny layer (seed 0) and a file of the user's; returns (OUT, spec, tree)."""
    out = root / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("the user's own file")
    backend = get_backend(backend_label)
    spec = load_any(TINY)
    graph, weights = graph_and_weights(spec, backend, seed=0)
    try:
        backend.build(spec, graph, weights, out, **options)
    except MoeIRError as err:  # tensorrt without TensorRT: the bundle is written, then the build stops
        assert backend_label == "tensorrt" and "TensorRT" in str(err)
    return out, spec, tree(root)


@pytest.mark.parametrize("backend_label, options", [
    ("torch", {}), ("onnx:portable", {"external_data": True}), ("onnx:ort", {}), ("onnx:plugin", {}),
    ("tensorrt", {}),
])
def test_a_fault_at_any_rename_leaves_the_previous_build(tmp_path, backend_label, options):
    """Every rename a build does (the staging writes and the final swap) is made to fail in turn, with a full
    disk and with Ctrl-C: each time OUT is byte-identical to the previous build and no staging is left."""
    root = tmp_path / "root"
    out, spec, before = _previous_build(backend_label, root, **options)
    backend = get_backend(backend_label)
    graph, weights = graph_and_weights(spec, backend, seed=1)  # other weights: a mix would show
    counter = FailAt(0, RuntimeError())  # counts the renames of this build, on a copy of OUT
    scratch = tmp_path / "scratch"
    shutil.copytree(out, scratch, symlinks=True)
    with mock.patch.object(os, "replace", counter):
        with contextlib.suppress(MoeIRError):
            backend.build(spec, graph, weights, scratch, **options)
    renames = counter.calls
    assert renames >= 2
    for at in range(1, renames + 1):
        for error in (enospc(), KeyboardInterrupt()):
            with mock.patch.object(os, "replace", FailAt(at, error)):
                with pytest.raises((MoeIRError, KeyboardInterrupt)) as caught:
                    backend.build(spec, graph, weights, out, **options)
            if isinstance(error, OSError):
                assert isinstance(caught.value, OutputError) and "No space left" in str(caught.value)
            assert tree(root) == before, (at, error)
            assert leftovers(root) == []
    # The same build without a fault does change OUT: the check above could fail.
    with contextlib.suppress(MoeIRError):
        backend.build(spec, graph, weights, out, **options)
    after = tree(root)
    assert after != before and after["out/notes.txt"] == before["out/notes.txt"] and leftovers(root) == []


def test_a_full_disk_while_writing_the_weights_is_one_line_and_changes_nothing(tmp_path):
    from moe_ir.backends.torch_eager import backend as torch_backend

    root = tmp_path / "root"
    out, _, before = _previous_build("torch", root)
    real = torch_backend.save_weights

    def half_then_full(weights, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # what a writer has put down when the disk fills
        raise enospc(path)

    with mock.patch.object(torch_backend, "save_weights", half_then_full):
        code, _, err = run_cli("build", TINY, "--backend", "torch", "--seed", "1", "-o", out)
    assert code == 1 and one_error_line(err)
    assert "No space left on device" in err and "nothing there was changed" in err
    assert tree(root) == before
    assert run_cli("build", TINY, "--backend", "torch", "--seed", "1", "-o", out)[0] == 0
    assert tree(root) != before and real is torch_backend.save_weights


def test_onnx_without_external_data_removes_the_previous_data_file(tmp_path):
    out = tmp_path / "out"
    spec = load_any(TINY)
    backend = get_backend("onnx:portable")
    graph, weights = graph_and_weights(spec, backend)
    backend.build(spec, graph, weights, out, external_data=True)
    assert sorted(p.name for p in out.iterdir()) == ["tiny.portable.onnx", "tiny.portable.onnx.data"]
    get_backend("onnx:ort").build(spec, *graph_and_weights(spec, get_backend("onnx:ort")), out)
    backend.build(spec, graph, weights, out, external_data=False)
    # The portable model now embeds its weights: its old .data is gone; the ort build beside it stays.
    assert sorted(p.name for p in out.iterdir()) == ["tiny.ort.onnx", "tiny.portable.onnx"]
    import onnx

    onnx.checker.check_model(str(out / "tiny.portable.onnx"))


def test_tensorrt_bundle_removes_an_engine_of_an_earlier_build(tmp_path):
    """Without TensorRT the bundle is committed and says the engine is missing: an engine from an earlier
    build in the folder would contradict it, so it goes in the same swap."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.engine").write_bytes(b"old engine")
    (out / "tiny.engine.json").write_text("{}")
    code, _, err = run_cli("build", TINY, "--backend", "tensorrt", "-o", out)
    if "TensorRT is not installed" not in err and "no CUDA GPU" not in err:
        pytest.skip("TensorRT and a GPU are present here: the build writes a real engine")
    assert code == 1 and err.count("moe-ir: error:") == 1
    assert sorted(p.name for p in out.iterdir()) == ["moe_ir_fused_moe_plugin.py", "tiny.plugin.onnx",
                                                     "tiny.tensorrt.json"]
    assert json.loads((out / "tiny.tensorrt.json").read_text())["engine_status"] == "missing"


def test_aoti_build_goes_through_the_writer(tmp_path):
    """One real AOTInductor build (about 30 s on CPU): the package replaces an earlier one, the user's file
    stays, nothing is left beside it; a hostile name is refused before anything is compiled."""
    import zipfile

    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.pt2").write_bytes(b"an earlier package")
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run_cli("build", TINY, "--backend", "aoti", "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tiny.pt2"]
    assert zipfile.is_zipfile(out / "tiny.pt2") and (out / "notes.txt").read_text() == "mine"
    assert f"wrote {out / 'tiny.pt2'}" in stdout


# ------------------------------------------------------------------------------------------------
# Robustness 6: output locations that cannot be used are one clear line, before any work


def test_output_location_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "taken" / "tiny.portable.onnx").mkdir(parents=True)
    before = tree(tmp_path)
    cases = [("file", 2, "is an existing file"), ("file/out", 2, "which is a file, not a folder"),
             ("file/a/b", 2, "which is a file, not a folder"), ("dangling", 2, "link to nothing"),
             ("taken", 1, "is a folder where the onnx:portable build writes a file")]
    for where, expected, needle in cases:
        code, _, err = run_cli("build", TINY, "--backend", "onnx", "-o", tmp_path / where)
        assert code == expected and needle in err and one_error_line(err), (where, err)
        assert tree(tmp_path) == before, where
    code, _, err = run_cli("build", TINY, "--backend", "onnx", "-o", "")
    assert code == 2 and "-o is empty" in err


def test_an_unwritable_output_folder_changes_nothing(tmp_path):
    """Where the folder cannot be made (no permission, a read-only file system), one line, exit 1, and no
    folder of the nested path was created. (Injected: the suite may run as root, which any mode lets write.)"""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))

    with mock.patch.object(tempfile, "mkdtemp", refuse):
        code, _, err = run_cli("build", TINY, "--backend", "torch", "-o", tmp_path / "a" / "b" / "c")
    assert code == 1 and "Permission denied" in err and one_error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode")
def test_a_read_only_folder_is_refused_up_front(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for where in (locked, locked / "sub"):
            code, _, err = run_cli("build", TINY, "--backend", "torch", "-o", where)
            assert code == 1 and "not writable" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------------------------
# import-hf: the spec and its weights are one pair


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Two tiny Mixtral checkpoints of different shapes, saved by transformers (so their pairs differ)."""
    transformers = pytest.importorskip("transformers")
    folders = []
    for experts in (3, 5):
        cfg = transformers.MixtralConfig(vocab_size=29, hidden_size=8, intermediate_size=6, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts,
                                         num_experts_per_tok=2, tie_word_embeddings=False)
        torch.manual_seed(experts)
        model = transformers.AutoModelForCausalLM.from_config(cfg).float()
        folder = tmp_path_factory.mktemp(f"mixtral{experts}")
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def _pair_hashes(spec_file: Path, weights_file: Path) -> tuple[str, str]:
    from safetensors import safe_open

    from moe_ir.model_builder import model_spec_hash

    with safe_open(str(weights_file), framework="pt") as f:
        recorded = f.metadata()["spec_hash"]
    return model_spec_hash(load_any(spec_file)), recorded


@pytest.mark.parametrize("fault", ["spec write", "first swap", "second swap", "interrupt"])
def test_import_hf_model_pair_is_replaced_together_or_not_at_all(tmp_path, hf_folders, fault):
    old, new = hf_folders
    out = tmp_path / "out"
    out.mkdir()
    def argv(folder):
        return ["import-hf", folder, "--model", "--weights", folder, "-o", out / "m.yaml",
                "--weights-out", out / "m.safetensors"]

    assert run_cli(*argv(old))[0] == 0
    spec_hash, recorded = _pair_hashes(out / "m.yaml", out / "m.safetensors")
    assert spec_hash == recorded
    before = tree(tmp_path)
    real_write_text = Path.write_text

    def full_disk_on_spec(self, *args, **kwargs):
        if self.name == "m.yaml":
            raise enospc(self)
        return real_write_text(self, *args, **kwargs)

    if fault == "spec write":
        patch = mock.patch.object(Path, "write_text", full_disk_on_spec)
    elif fault == "interrupt":
        patch = mock.patch.object(os, "replace", FailAt(2, KeyboardInterrupt()))
    else:
        patch = mock.patch.object(os, "replace", FailAt(1 if fault == "first swap" else 2, enospc()))
    with patch:
        code, _, err = run_cli(*argv(new))
    assert code == (130 if fault == "interrupt" else 1) and one_error_line(err), err
    assert tree(tmp_path) == before and leftovers(tmp_path) == []
    # Without a fault the new pair replaces the old one, both halves.
    assert run_cli(*argv(new))[0] == 0
    spec_hash, recorded = _pair_hashes(out / "m.yaml", out / "m.safetensors")
    assert spec_hash == recorded and tree(tmp_path) != before


def test_import_hf_layer_pair_and_bad_outputs(tmp_path, hf_folders):
    old, _ = hf_folders
    out = tmp_path / "out"
    out.mkdir()
    (out / "l.yaml").write_text("old spec\n")
    (out / "l.safetensors").write_bytes(b"old weights")
    before = tree(tmp_path)
    argv = ["import-hf", old, "--weights", old, "--weights-out", out / "l.safetensors", "-o", out / "l.yaml"]
    real_write_text = Path.write_text

    def full_disk_on_spec(self, *args, **kwargs):
        if self.name == "l.yaml":
            raise enospc(self)
        return real_write_text(self, *args, **kwargs)

    with mock.patch.object(Path, "write_text", full_disk_on_spec):
        code, _, err = run_cli(*argv)
    assert code == 1 and "No space left on device" in err and tree(tmp_path) == before
    # The same file for both, or a folder where a file goes: a usage error before anything is read.
    code, _, err = run_cli("import-hf", old, "--weights", old, "--weights-out", out / "l.yaml", "-o", out / "l.yaml")
    assert code == 2 and "also another output" in err
    code, _, err = run_cli("import-hf", old, "--weights", old, "--weights-out", out, "-o", out / "x.yaml")
    assert code == 2 and "is a folder" in err
    assert tree(tmp_path) == before
    assert run_cli(*argv)[0] == 0
    assert (out / "l.yaml").read_text() != "old spec\n" and (out / "l.safetensors").read_bytes() != b"old weights"


# ------------------------------------------------------------------------------------------------
# the property: output locations, names and faults drawn together


def _layout(root: Path, kind: str, depth: int) -> Path:
    """Make the situation `kind` under root and return the -o to pass."""
    nested = root.joinpath(*[f"d{i}" for i in range(depth)], "out")
    if kind == "new":
        return nested
    if kind == "empty":
        nested.mkdir(parents=True)
        return nested
    if kind == "used":  # a previous build and the user's own files
        nested.mkdir(parents=True)
        (nested / "notes.txt").write_text("mine")
        for name in ("model.py", "weights.safetensors", "spec.yaml", "tiny.portable.onnx", "tiny.portable.onnx.data",
                     "tm.portable.onnx.data", "tm.ort.onnx", "tm.plugin.onnx"):
            (nested / name).write_text(f"old {name}")
        return nested
    if kind == "file":
        nested.parent.mkdir(parents=True, exist_ok=True)
        nested.write_text("a file")
        return nested
    if kind == "under-file":
        nested.parent.mkdir(parents=True, exist_ok=True)
        nested.write_text("a file")
        return nested / "sub"
    if kind == "dangling":
        nested.parent.mkdir(parents=True, exist_ok=True)
        nested.symlink_to(root / "nowhere")
        return nested
    if kind == "link-to-folder":
        target = root / "real"
        target.mkdir()
        nested.parent.mkdir(parents=True, exist_ok=True)
        nested.symlink_to(target)
        return nested
    if kind == "folder-in-the-way":
        for name in ("model.py", "tiny.portable.onnx", "tm.portable.onnx", "tiny.ort.onnx", "tm.ort.onnx",
                     "tiny.plugin.onnx", "tm.plugin.onnx"):
            (nested / name).mkdir(parents=True)
        return nested
    raise AssertionError(kind)


def _inside(path: str, out: Path, root: Path) -> bool:
    """Whether a path of root's tree (relative) lies in the output folder (or the folder a link -o names)."""
    full = os.path.realpath(root / path)
    real_out = os.path.realpath(out)
    return full == real_out or full.startswith(real_out + os.sep) or (root / path) == out


try:
    from hypothesis import HealthCheck, event, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None


def _expected_files(backend: str, name: str) -> set[str]:
    """The files a successful build of spec `name` writes into -o."""
    if backend == "torch":
        return {"model.py", "weights.safetensors", "spec.yaml"}
    flavour = {"onnx-ort": "ort", "onnx-plugin": "plugin"}.get(backend, "portable")
    return {f"{name}.{flavour}.onnx"} | ({f"{name}.{flavour}.onnx.data"} if backend == "onnx-external" else set())


class SignalAt(FailAt):
    """os.replace that sends this process SIGINT (a real Ctrl-C) on its `at`-th call, then goes on."""

    def __call__(self, src, dst, **kw):
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGINT)
        return REAL_REPLACE(src, dst, **kw)


if given is not None:
    VALID_NAMES = ["tiny", "tm", "a.b-c_d", "x" * 128, "Z9"]
    HOSTILE = ["../up", "../../up", "/ABS/up", "a/b", "..", ".", "", "x" * 129, "é", "a b", "a\nb", "-x", "~", "a\\b"]
    NAMES = st.one_of(st.sampled_from(VALID_NAMES), st.sampled_from(VALID_NAMES), st.sampled_from(VALID_NAMES),
                      st.sampled_from(HOSTILE), st.text(alphabet="ab./\\-_\n ~", max_size=8))
    KINDS = ["new", "new", "empty", "used", "used", "link-to-folder", "folder-in-the-way", "file", "under-file",
             "dangling"]

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(kind=st.sampled_from(KINDS), depth=st.integers(0, 2), spec_kind=st.sampled_from(["layer", "model"]),
           name=NAMES, backend=st.sampled_from(["torch", "onnx", "onnx-ort", "onnx-plugin", "onnx-external"]),
           fault=st.sampled_from(["none", "none", "enospc", "interrupt", "signal"]), fault_at=st.integers(1, 4),
           relative=st.booleans())
    def test_property_outputs_stay_inside_and_failures_change_nothing(kind, depth, spec_kind, name, backend, fault,
                                                                       fault_at, relative):
        """Over output locations (new, existing, used by an earlier build and the user, a link, a file, under a
        file, a dangling link, a folder in the way; absolute or relative), spec names (plain and hostile) and
        faults at the k-th rename (a full disk, an exception Ctrl-C, a real SIGINT): exit code 0, 1 or 2 (130
        after a Ctrl-C); one error line and no traceback on failure; nothing written outside -o; -o unchanged
        after any failure; a success (or a Ctrl-C held until the swap was done) leaves the whole build and no
        staging."""
        base = Path(tempfile.mkdtemp(prefix="moe-ir-outputs-"))
        cwd = os.getcwd()
        try:
            root = base / "root"
            root.mkdir()
            name = name.replace("/ABS", str(base))
            spec_dir = base / "specs"
            spec_dir.mkdir()
            if spec_kind == "layer":
                spec_file = spec_dir / "layer.yaml"
                spec_file.write_text(TINY.read_text().replace("name: tiny", f"name: {json.dumps(name)}"))
            else:
                spec_file = model_spec_file(spec_dir, name)
            out = _layout(root, kind, depth)
            argv = ["build", spec_file, "--backend", backend.split("-")[0], "-o", out]
            argv += {"onnx-ort": ["--flavour", "ort"], "onnx-plugin": ["--flavour", "plugin"],
                     "onnx-external": ["--external-data"]}.get(backend, [])
            if relative:
                os.chdir(root)
                argv[5] = os.path.relpath(out, root)
            before = tree(base)
            replace = {"enospc": FailAt(fault_at, enospc()), "interrupt": FailAt(fault_at, KeyboardInterrupt()),
                       "signal": SignalAt(fault_at, RuntimeError())}.get(fault, FailAt(0, RuntimeError()))
            with mock.patch.object(os, "replace", replace):
                code, stdout, err = run_cli(*argv)
            os.chdir(cwd)
            after = tree(base)
            fired = fault != "none" and replace.calls >= fault_at
            event(f"exit {code}" + (f" after {fault}" if fired else ""))
            assert code in ((0, 1, 2, 130) if fired and fault in ("interrupt", "signal") else (0, 1, 2)), err
            assert "Traceback" not in err
            if code != 0:
                assert one_error_line(err), err
            changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
            # Nothing outside -o (the paths through a link -o count as inside the folder it names). Folders made
            # on the way to a new -o, as `mkdir -p` makes them, are not outside it.
            rel_out = Path(os.path.abspath(os.path.join(root, out))).relative_to(base)
            ancestors = {str(rel_out.parents[i]) for i in range(len(rel_out.parents) - 1)}
            outside = {p for p in changed if not _inside(p, out, base)
                       and not (p in ancestors and before.get(p) is None and after.get(p) == ("dir",))}
            assert not outside, (sorted(outside), err)
            assert leftovers(base) == []
            complete = _expected_files(backend, name) <= {f.name for f in Path(out).iterdir()} \
                if Path(out).is_dir() else False
            if code == 0:
                event("built")
                written = [line.split(" ", 1)[1].rsplit(" (", 1)[0] for line in stdout.splitlines()
                           if line.startswith("wrote ")]
                assert written and all(os.path.isfile(os.path.join(root, w)) for w in written) and complete
            elif code == 130 and fault == "signal" and after != before:
                event("Ctrl-C held until the swap was done")
                assert complete, (sorted(changed), err)  # the whole new build, never a mix
            else:
                assert after == before, (kind, sorted(changed), err)
        finally:
            os.chdir(cwd)
            shutil.rmtree(base, ignore_errors=True)
