"""From the command line: personalize, restore, degrade and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfstorer.adapter import Adapter
from pfstorer.cli import build_parser, main
from pfstorer.errors import PFStorerError

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def person(lfw_bench) -> list[Path]:
    name = next(iter(lfw_bench))
    return lfw_bench[name]


def test_help_explains_every_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("personalize", "restore", "degrade", "evaluate", "info"):
        assert name in sub.choices
        assert sub.choices[name].description, f"{name} --help has no description"
    for action in sub.choices["restore"]._actions:
        if action.dest not in ("help",):
            assert action.help, f"restore option {action.dest} is undocumented"


def test_fresh_adapter_restores_bit_identical_png(person, tmp_path, capsys):
    adapter = tmp_path / "adapter0"
    code, out, _ = run(["personalize", "--base", "tiny", "--refs", *person[:5], "--out", adapter,
                        "--steps", "0", "--quiet"], capsys)
    assert code == 0 and "0 steps" in out
    common = ["restore", "--base", "tiny", "--input", person[5], "--steps", "3", "--seed", "4", "--quiet"]
    assert run([*common, "--out", tmp_path / "base.png"], capsys)[0] == 0
    assert run([*common, "--adapter", adapter, "--out", tmp_path / "pers.png"], capsys)[0] == 0
    assert (tmp_path / "base.png").read_bytes() == (tmp_path / "pers.png").read_bytes()


def test_base_and_device_default_to_the_settings(person, tmp_path, capsys, monkeypatch):
    """No --base/--device: the base of Settings (here $PFSTORER_BASE), as `pfstorer serve` would use."""
    common = ["restore", "--input", person[5], "--steps", "2", "--seed", "4", "--quiet"]
    assert run([*common, "--base", "tiny", "--device", "cpu", "--out", tmp_path / "named.png"], capsys)[0] == 0
    monkeypatch.setenv("PFSTORER_BASE", "tiny")
    monkeypatch.setenv("PFSTORER_DEVICE", "cpu")
    assert run([*common, "--out", tmp_path / "settings.png"], capsys)[0] == 0
    assert (tmp_path / "named.png").read_bytes() == (tmp_path / "settings.png").read_bytes()
    monkeypatch.setenv("PFSTORER_BASE", "tiny-latent")  # really read: another base, another image
    assert run([*common, "--out", tmp_path / "latent.png"], capsys)[0] == 0
    assert (tmp_path / "latent.png").read_bytes() != (tmp_path / "named.png").read_bytes()


def test_thirty_steps_learn_the_person(person, tmp_path, capsys):
    adapter = tmp_path / "adapter30"
    code, out, _ = run(["personalize", "--base", "tiny", "--refs", *person[:5], "--out", adapter,
                        "--steps", "30", "--seed", "0", "--quiet"], capsys)
    assert code == 0 and "losses:" in out
    meta = json.loads((adapter / "adapter.json").read_text())
    losses = meta["final_losses"]
    # the probe (fixed crop, degradation, noise, timesteps) falls: the adapter helps denoise this person
    assert losses["probe_end"] < losses["probe_start"]
    assert len(meta["loss_curve"]) == 30  # per-step losses are noisy (random t, crops): the probe is the signal
    alphas = [t for k, t in Adapter.load(adapter).tensors.items() if k.endswith("alpha")]
    assert max(float(a.abs().max()) for a in alphas) > 0
    common = ["restore", "--base", "tiny", "--input", person[5], "--steps", "3", "--seed", "4", "--quiet"]
    run([*common, "--out", tmp_path / "base.png"], capsys)
    run([*common, "--adapter", adapter, "--out", tmp_path / "pers.png"], capsys)
    run([*common, "--adapter", adapter, "--out", tmp_path / "pers2.png"], capsys)
    assert not np.array_equal(pixels(tmp_path / "base.png"), pixels(tmp_path / "pers.png"))
    assert (tmp_path / "pers.png").read_bytes() == (tmp_path / "pers2.png").read_bytes()


def test_degrade_is_seeded(person, tmp_path, capsys):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run(["degrade", "--input", person[0], "--out", tmp_path / f"{name}.png", "--level", "heavy",
                    "--seed", seed], capsys)[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


@pytest.fixture(scope="module")
def tiny_adapter(person, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    main(["personalize", "--base", "tiny", "--refs", *map(str, person[:3]), "--out", str(out), "--steps", "0", "--quiet"])
    return out


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "no such file"),
        ("corrupt", "corrupt or truncated"),
        ("too_few", "at least 3"),
        ("too_many_pixels", "pixels"),
        ("wrong_adapter", "trained on base"),
        ("not_adapter", "not an adapter folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(case, expect, person, tiny_adapter, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(person[0].read_bytes()[:600])
    out = tmp_path / "out.png"
    args = {
        "missing": ["restore", "--base", "tiny", "--input", tmp_path / "nope.jpg", "--out", out],
        "corrupt": ["restore", "--base", "tiny", "--input", corrupt, "--out", out],
        "too_few": ["personalize", "--base", "tiny", "--refs", *person[:2], "--out", tmp_path / "a"],
        "too_many_pixels": ["restore", "--base", "tiny", "--input", person[0], "--out", out, "--max-pixels", "1000"],
        "wrong_adapter": ["restore", "--base", "tiny-latent", "--adapter", tiny_adapter, "--input", person[0],
                          "--out", out, "--steps", "1"],
        "not_adapter": ["restore", "--base", "tiny", "--adapter", tmp_path, "--input", person[0], "--out", out],
    }[case]
    code, _, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not out.exists()


def test_console_script_prints_no_traceback(tmp_path):
    """The installed command, as a user runs it: one line, exit 2."""
    exe = Path(sys.executable).with_name("pfstorer")
    bad = tmp_path / "notes.jpg"
    bad.write_text("these are not pixels")
    proc = subprocess.run([str(exe), "restore", "--input", str(bad), "--out", str(tmp_path / "o.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_listing_commands_imports_no_heavy_library():
    # `pfstorer --help` must answer at once: handlers are imported when their command runs
    code = ("import sys; from pfstorer.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'scipy', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_json_output_is_the_only_thing_on_stdout():
    """What Ray and libraries print while a --json command works (Python prints, raw writes to
    fd 1, child processes) ends up on stderr; stdout holds the JSON alone."""
    code = (
        "import json, os, subprocess, sys\n"
        "from pfstorer.cli import stdout_to_stderr\n"
        "with stdout_to_stderr():\n"
        "    print('worker died')\n"
        "    os.write(1, b'raw fd write\\n')\n"
        "    subprocess.run([sys.executable, '-c', 'print(42)'], check=True)\n"
        "print(json.dumps({'ok': 1}))\n"
        "with stdout_to_stderr(False):\n"
        "    print('kept')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    first, rest = proc.stdout.split("\n", 1)
    assert json.loads(first) == {"ok": 1} and rest == "kept\n"
    assert proc.stderr.split() == ["worker", "died", "raw", "fd", "write", "42"]


def test_a_command_with_a_missing_part_says_what_to_install(capsys):
    import argparse

    from pfstorer.cli import lazy

    handler = lazy("pfstorer_no_such_module:main", extra="eval")
    with pytest.raises(PFStorerError, match=r"pfstorer\[eval\]"):
        handler(argparse.Namespace())


def test_restore_writes_webp_and_refuses_unknown_names_before_work(person, tmp_path, capsys):
    code, out, _ = run(["restore", "--base", "tiny", "--input", person[0], "--out", tmp_path / "r.webp",
                        "--quality", "70", "--quiet"], capsys)
    assert code == 0 and (tmp_path / "r.webp").read_bytes()[:4] == b"RIFF"
    code, _, err = run(["restore", "--base", "tiny", "--input", person[0], "--out", tmp_path / "r.gif"], capsys)
    assert code == 2 and ".webp" in err and not (tmp_path / "r.gif").exists()
