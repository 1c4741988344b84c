"""The command line: flags, errors and start-up (the README's commands run in tests/test_docs.py)."""

from __future__ import annotations

import pytest

from jaxinfer import cli


def test_generate_compiles_on_first_use_unless_warmup_is_asked(capsys, tmp_path):
    from jaxinfer.testing import tiny_gguf

    model = tmp_path / "tiny.gguf"
    tiny_gguf(model)
    for flags, compiled in (([], False), (["--warmup"], True)):
        assert cli.main(["generate", "hi", "--model", str(model), "--max-tokens", "3", *flags]) == 0
        err = capsys.readouterr().err
        assert "ready" in err and "3 tokens in" in err
        assert ("compiled" in err) == compiled and ("compile on first use" in err) != compiled


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
