"""The ``gim-tl`` command line (``gim_tl.cli.main``).

The SmolLM2 tests (``slow``) reuse the run-wide ``smollm2_bridge`` fixture: ``load_model`` answers the default
model on a bridge with it (``test_models.py`` checks the real loading path).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from gim_tl import cli  # noqa: E402

needs_views = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None or importlib.util.find_spec("pandas") is None,
    reason="the command writes PNGs and CSVs: pip install 'gim_tl[views]'")

from conftest import HAS_HOOKED, needs_smollm2  # noqa: E402


@pytest.fixture
def memo_load(monkeypatch, smollm2_bridge):
    """``gim_tl.models.load_model`` that answers the default SmolLM2 on a bridge with the run's shared model."""
    import gim_tl.models as models

    real = models.load_model

    def load(source=models.DEFAULT_MODEL, **kwargs):
        if str(source) == str(models.DEFAULT_MODEL) and kwargs.get("backend", "bridge") == "bridge":
            return smollm2_bridge
        return real(source, **kwargs)

    monkeypatch.setattr(models, "load_model", load)
    return load


def run(argv, capsys):
    """``main(argv)`` → (exit status, stdout, stderr); argparse/usage errors give their SystemExit code."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------
# Fast: errors found before any model is loaded
# --------------------------------------------------------------------------------------


def test_missing_prompts_file(tmp_path, capsys):
    code, out, err = run(["explain", "--file", str(tmp_path / "nope.txt")], capsys)
    assert code == 2 and "nope.txt" in err and "does not exist" in err and "Traceback" not in err


def test_prompt_and_file_together(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("a\n")
    code, _, err = run(["explain", "hello", "--file", str(path)], capsys)
    assert code == 2 and "either a prompt or --file" in err


def test_empty_prompts_file(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("\n  \n")
    code, _, err = run(["explain", "--file", str(path)], capsys)
    assert code == 2 and "has no prompts" in err


def test_missing_model_path(tmp_path, capsys):
    code, _, err = run(["explain", "--model", str(tmp_path / "missing.gguf")], capsys)
    assert code == 2 and "no such file or directory" in err


def test_unknown_method_and_no_command(capsys):
    code, _, err = run(["explain", "--method", "lrp"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = run([], capsys)
    assert code == 2 and "required" in err


@pytest.mark.skipif(HAS_HOOKED, reason="TL 3.9 has HookedTransformer: the hooked backend would load the model")
def test_hooked_backend_on_tl4_is_a_clear_error(capsys):
    code, _, err = run(["explain", "--backend", "hooked"], capsys)
    assert code == 2 and "HookedTransformer" in err and "transformer-lens==3.9.0" in err and "Traceback" not in err


def test_read_jobs_parses_tab_targets(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("The capital of France is\t Paris\n\nWhen Mary and John went\n", encoding="utf-8")
    jobs = cli.read_jobs(path, default_target=" x")
    assert [(j.prompt, j.target) for j in jobs] == [("The capital of France is", " Paris"),
                                                    ("When Mary and John went", " x")]
    assert jobs[1].where.endswith(":3: ")


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "gim_tl.cli", "explain", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "--target" in proc.stdout and "--file" in proc.stdout


# --------------------------------------------------------------------------------------
# Slow: SmolLM2
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_smollm2
@needs_views
def test_default_command(tmp_path, capsys, memo_load):
    code, out, err = run(["explain", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "prompt:     'The capital of France is'" in out
    assert "logit(' Paris') at position 4" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("pos"))
    assert "GIM" in header and "Gradient × Input" in header
    table_rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1] for r in table_rows[:5]] == ["The", "·capital", "·of", "·France", "·is"]
    assert all(len(r) == 4 for r in table_rows[:5])  # position, token, GIM score, plain score
    html = (tmp_path / "explain.html").read_text(encoding="utf-8")
    assert html.count('class="gim-row"') == 2 and "·France" in html
    png = (tmp_path / "explain.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
@needs_smollm2
@needs_views
def test_prompts_file(tmp_path, capsys, memo_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\t Paris\nThe capital of Italy is\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    code, out, err = run(["explain", "--file", str(prompts), "--out", str(out_dir), "--method", "gim",
                          "--method", "integrated_gradients", "--ig-steps", "4", "--contrast", " London"], capsys)
    assert code == 0, err
    for n in (1, 2):
        assert (out_dir / f"explain_{n}.html").stat().st_size > 0
        assert (out_dir / f"explain_{n}.png").stat().st_size > 0
    summary = (out_dir / "summary.html").read_text(encoding="utf-8")
    assert "The capital of Italy is" in summary and summary.count('class="gim-row"') == 4
    csv = (out_dir / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert csv[0].startswith("prompt,position,token") and "GIM" in csv[0] and "Integrated Gradients" in csv[0]
    assert len(csv) == 1 + 5 + 5
    lines = [line.lstrip() for line in out.splitlines()]
    assert any(line.startswith("1  ' Paris'") for line in lines)
    assert any(line.startswith("2  '") for line in lines)
    assert "prompts" in err  # the progress bar


@pytest.mark.slow
@needs_smollm2
def test_bad_target_exits_with_message(tmp_path, capsys, memo_load):
    code, out, err = run(["explain", "The capital of France is", "--target", " France is", "--out", str(tmp_path),
                          "--no-png"], capsys)
    assert code == 2
    assert "gim-tl: error: target ' France is' is 2 tokens" in err and "Traceback" not in err
    assert not (tmp_path / "explain.html").exists()


def test_empty_prompt_is_an_error(capsys):
    for prompt in ("", "   "):
        code, out, err = run(["explain", prompt], capsys)
        assert code == 2 and "the prompt is empty" in err and "Traceback" not in err and out == ""


def test_prompts_file_that_is_a_directory(tmp_path, capsys):
    code, _, err = run(["explain", "--file", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err and "does not exist" not in err


def test_target_and_target_id_are_exclusive(capsys):
    code, _, err = run(["explain", "x", "--target", " Paris", "--target-id", "7042"], capsys)
    assert code == 2 and "not allowed with argument" in err


@pytest.mark.slow
@needs_smollm2
def test_target_id_explains_that_token(tmp_path, capsys, memo_load):
    code, out, err = run(["explain", "The capital of France is", "--target-id", "7042", "--method", "gim",
                          "--out", str(tmp_path), "--no-png"], capsys)
    model = memo_load()
    assert code == 0, err
    assert f"logit({model.tokenizer.decode([7042])!r})" in out and "warning" not in err


@pytest.mark.slow
@needs_smollm2
def test_numeric_target_text_is_not_silent(tmp_path, capsys, memo_load):
    """``--target 5`` is the text "5" (one token): explained, with a warning naming --target-id."""
    code, out, err = run(["explain", "2 + 3 =", "--target", "5", "--method", "gim", "--out", str(tmp_path),
                          "--no-png"], capsys)
    assert code == 0, err
    assert "logit('5')" in out
    assert "--target '5' is read as text" in err and "--target-id 5" in err
    # a number of several tokens: the error says how to give an id
    code, _, err = run(["explain", "2 + 3 =", "--target", "7042", "--method", "gim", "--out", str(tmp_path),
                        "--no-png"], capsys)
    assert code == 2 and "is 4 tokens" in err and "use --target-id 7042" in err and "Traceback" not in err


@pytest.mark.slow
@needs_smollm2
def test_target_without_its_leading_space_warns(tmp_path, capsys, memo_load):
    code, out, err = run(["explain", "The capital of France is", "--target", "Paris", "--contrast", "London",
                          "--method", "gim", "--out", str(tmp_path), "--no-png"], capsys)
    assert code == 0, err
    assert "logit('Paris')" in out   # explained as asked ...
    assert "--target 'Paris' has no leading space, but ' Paris' is one token" in err   # ... with a warning
    assert "--contrast 'London' has no leading space" in err
    code, _, err = run(["explain", "The capital of France is", "--target", " Paris", "--method", "gim",
                        "--out", str(tmp_path), "--no-png"], capsys)
    assert code == 0 and "warning" not in err


@pytest.mark.slow
@needs_smollm2
def test_bad_line_in_prompts_file_keeps_the_other_lines(tmp_path, capsys, memo_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\t Paris\nThe capital of Italy is\t Rome is\n"
                       "The capital of Spain is\n", encoding="utf-8")
    out_dir = tmp_path / "out"
    code, out, err = run(["explain", "--file", str(prompts), "--out", str(out_dir), "--method", "gim",
                          "--no-png"], capsys)
    assert code == 2
    assert f"{prompts}:2: target ' Rome is' is 2 tokens" in err and "1 of 3 prompts failed" in err
    assert (out_dir / "explain_1.html").exists() and (out_dir / "explain_3.html").exists()
    assert not (out_dir / "explain_2.html").exists()
    summary = (out_dir / "summary.html").read_text(encoding="utf-8")
    assert "3. The capital of Spain is" in summary and "Italy" not in summary
    assert any(line.lstrip().startswith("3  '") for line in out.splitlines())
