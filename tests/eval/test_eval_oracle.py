"""The grader on MATH-500's reference solutions fed as completions ("oracle"): right ones score ~100%,
shuffled ones (another problem's solution) ~0%; lengths and the exceed ratio follow the tokenizer."""

import json
from pathlib import Path

import pytest

from gdpo.eval.__main__ import main

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "math500.jsonl").exists(), reason="needs ../shared/data/math500.jsonl")


def _solutions() -> dict[str, str]:
    rows = [json.loads(line) for line in open(DATA / "math500.jsonl", encoding="utf-8")]
    return {r["id"]: r["solution"] for r in rows}


def _run(out: Path, *extra: str) -> tuple[dict, list[dict]]:
    rc = main(["--oracle", "solution", "--benchmarks", "math500", "--k", "1", "--data-dir", str(DATA),
               "--output-dir", str(out), "--grader-workers", "2", "--no-progress", *extra])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return results, samples


@needs_data
@pytest.mark.slow
def test_math500_reference_solutions_score_at_least_98_percent(tmp_path, capsys):
    from gdpo.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")  # byte-level: one token per UTF-8 byte
    results, samples = _run(tmp_path / "true", "--tokenizer", str(tmp_path / "tok"), "--exceed-length", "1000")
    m = results["benchmarks"]["math500"]
    assert m["num_problems"] == 500 and len(samples) == 500
    assert m["avg@1"] >= 0.98
    assert m["pass@1"] == m["avg@1"] == sum(s["correct"] for s in samples) / 500
    # Lengths are tokens of the given tokenizer, i.e. bytes here; exceed counts those strictly over 1000.
    sol = _solutions()
    byte_len = {pid: len(text.encode("utf-8")) for pid, text in sol.items()}
    assert all(s["length"] == byte_len[s["problem_id"]] for s in samples)
    assert m["exceed_ratio"] == pytest.approx(sum(n > 1000 for n in byte_len.values()) / 500)
    assert 0 < m["exceed_ratio"] < 1  # the check is not vacuous
    assert m["max_length"] == max(byte_len.values())
    assert results["length_unit"].startswith("tokens (")
    assert "math500" in capsys.readouterr().out  # the table


@needs_data
@pytest.mark.slow
def test_math500_shuffled_solutions_score_at_most_2_percent(tmp_path):
    results, samples = _run(tmp_path / "shuffled", "--oracle-shuffle", "--exceed-length", "100")
    m = results["benchmarks"]["math500"]
    assert m["avg@1"] <= 0.02
    sol = _solutions()
    assert all(s["completion"] != sol[s["problem_id"]] for s in samples)  # every problem got another's
    assert sorted(s["completion"] for s in samples) == sorted(sol.values())  # ...and each solution is used once
    # Without a tokenizer, lengths are whitespace words.
    words = {text: len(text.split()) for text in sol.values()}
    assert all(s["length"] == words[s["completion"]] for s in samples)
    assert m["exceed_ratio"] == pytest.approx(sum(n > 100 for n in words.values()) / 500)
    assert results["length_unit"] == "whitespace words"
