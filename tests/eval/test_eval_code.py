"""`python -m gdpo.eval --benchmarks mbpp,humaneval`: the oracle scores the reference solutions (MBPP's test split
has one reference that fails its own tests, task 341, as ../shared/data/code/README.md lists) and ~0 when the
solutions are shuffled across problems; model prompts use the code recipes' template through the shared renderer."""

import json
import os
from pathlib import Path

import pytest

from gdpo.eval.__main__ import main

SHARED = Path(os.environ.get("GDPO_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
needs_mbpp = pytest.mark.skipif(not (SHARED / "code" / "mbpp.jsonl").exists(), reason="needs shared/data/code")


@needs_mbpp
def test_oracle_scores_references_and_shuffled_scores_zero(tmp_path, capsys):
    from gdpo.eval.benchmarks import BENCHMARKS, load_problems

    mbpp = load_problems(BENCHMARKS["mbpp"], SHARED)
    assert len(mbpp) == 500 and mbpp[0].id == "11" and mbpp[-1].id == "510"
    assert [p.id for p in mbpp if not p.row["reference_passes"]] == ["341"]
    common = ["--oracle", "solution", "--benchmarks", "mbpp,humaneval", "--k", "2", "--limit", "4",
              "--data-dir", str(SHARED), "--grader-workers", "0", "--no-progress"]
    assert main(common + ["--output-dir", str(tmp_path / "ref")]) == 0
    res = json.loads((tmp_path / "ref" / "results.json").read_text())["benchmarks"]
    assert res["mbpp"]["avg@2"] == 1.0 and res["humaneval"]["avg@2"] == 1.0
    assert res["mbpp"]["pass@1"] == 1.0 and res["mbpp"]["bug_ratio"] == 0.0 and "maj@2" not in res["mbpp"]
    assert main(common + ["--oracle-shuffle", "--output-dir", str(tmp_path / "shuf")]) == 0
    res = json.loads((tmp_path / "shuf" / "results.json").read_text())["benchmarks"]
    assert res["mbpp"]["avg@2"] == 0.0 and res["humaneval"]["avg@2"] == 0.0
    assert res["mbpp"]["bug_ratio"] == 1.0  # another problem's function: the called name is undefined
    table = capsys.readouterr().out
    assert "bug" in table.splitlines()[0] and "pass@2" in table


@needs_mbpp
def test_mbpp_341_reference_fails_its_own_tests():
    from gdpo.eval.benchmarks import BENCHMARKS, code_tests, load_problems
    from gdpo.eval.runner import grade_code_samples

    p = next(p for p in load_problems(BENCHMARKS["mbpp"], SHARED) if p.id == "341")
    _, correct, clusters, bug = grade_code_samples(code_tests(p), [p.solution], 5.0)
    assert correct == [False] and bug == [{"bug": False}] and clusters == [-1]


@needs_mbpp
def test_code_prompts_are_the_recipes_prompts():
    from gdpo.data import render_prompt
    from gdpo.eval.benchmarks import BENCHMARKS, MBPP_PROMPT_TEMPLATE, load_problems
    from gdpo.eval.runner import ModelSource
    from gdpo.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    p = load_problems(BENCHMARKS["mbpp"], SHARED, limit=1)[0]
    src = ModelSource(None, tok, benchmark_templates={"mbpp": MBPP_PROMPT_TEMPLATE})
    text = src.prompt_text(p, "mbpp")
    assert text == render_prompt(tok, prompt=p.row["text"], row=p.row, prompt_field="text",
                                 prompt_template=MBPP_PROMPT_TEMPLATE)
    assert text == ("<|im_start|>user\n" + p.row["text"] + "\nYour code should pass this test:\n\n"
                    + p.row["test_list"][0] + "\n\nWrite the Python function in a single ```python code block."
                    + "<|im_end|>\n<|im_start|>assistant\n")
