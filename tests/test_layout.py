"""The architecture's promises: the core never imports the CLI, and a run directory's config.yaml
holds the values that actually ran."""

import ast
from pathlib import Path

import yaml

from _cli import run

ROOT = Path(__file__).resolve().parent.parent / "scmctl"


def _imports(path: Path) -> list[str]:
    """Every module an `import` / `from ... import` in `path` names (at any depth: lazy imports
    inside functions count), with relative imports made absolute."""
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]
    return names


def test_no_core_module_imports_the_cli():
    core = [p for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts[:1]]
    assert len(core) > 20 and ROOT / "training" / "loop.py" in core
    offenders = {str(p.relative_to(ROOT)): n for p in core for n in _imports(p)
                 if n == "scmctl.cli" or n.startswith("scmctl.cli.")}
    offenders.pop("__main__.py", None)  # `python -m scmctl` is the CLI's entry point
    assert not offenders, offenders


def test_the_import_walk_sees_lazy_and_relative_imports(tmp_path):
    """The walker itself: a lazy import inside a function and a relative import are found."""
    pkg = ROOT / "metrics" / "_probe_for_test.py"
    src = "def f():\n    from scmctl.cli.common import console\n\nfrom ..cli import app\n"
    try:
        pkg.write_text(src)
        names = _imports(pkg)
    finally:
        pkg.unlink()
    assert "scmctl.cli.common" in names and "scmctl.cli" in names


SMALL = ["--set", "data.resolution=8", "--set", "network.model_channels=16",
         "--set", "network.attn_resolutions=[4]", "--set", "network.head_channels=16",
         "--set", "train.grid_every=0", "--set", "train.device=cpu", "--batch", "4", "--steps", "1"]


def test_config_yaml_records_the_jvp_mode_that_ran(tmp_path, capsys):
    """bf16 with an fp32 tangent runs the dual jvp mode as separate: config.yaml and the
    checkpoint say 'separate', the user is told why, and re-running the command resumes."""
    from scmctl.training import checkpoint as ckpt_io

    rd = tmp_path / "bf16"
    args = ["train", "--run-dir", rd, *SMALL, "--set", "train.precision=bf16", "--set", "loss.jvp_fp32=true"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert "loss.jvp_mode=dual runs as separate" in err
    saved = yaml.safe_load((rd / "config.yaml").read_text())
    assert saved["loss"]["jvp_mode"] == "separate" and saved["train"]["precision"] == "bf16"
    assert ckpt_io.load(rd)["config"]["loss"]["jvp_mode"] == "separate"
    code, _, err = run(capsys, *args, "--steps", 2)  # resumes: the recorded mode is accepted
    assert code == 0, err

    code, out, err = run(capsys, *args, "--dry-run", "--json")  # --dry-run shows the same
    assert code == 0, err
    import json
    assert json.loads(out)["config"]["loss"]["jvp_mode"] == "separate"

    plain = tmp_path / "fp32"
    assert run(capsys, "train", "--run-dir", plain, *SMALL)[0] == 0
    assert yaml.safe_load((plain / "config.yaml").read_text())["loss"]["jvp_mode"] == "dual"
