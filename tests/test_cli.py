"""The command line, end to end on the real model."""

from __future__ import annotations

import io

import pytest

from jaxinfer import cli


def test_generate_prints_text_and_status(capsys):
    assert cli.main(["generate", "The capital of France is", "--max-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "[jaxinfer] loading smollm2-135m" in captured.err and "ready" in captured.err


def test_chat_reads_messages_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    assert cli.main(["chat", "--max-tokens", "32"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["generate", "hi", "--model", "nope"], "unknown model 'nope'"),
    (["generate", "hi", "--tensor-parallel-size", "3"], "choose sizes whose product is 8"),
    (["generate", "hi", "--sequence-parallel-size", "2", "--attention-backend", "pallas_gpu"],
     "needs attention_backend"),
    (["generate", "hi", "--attention-backend", "flash"], "attention_backend must be one of"),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
