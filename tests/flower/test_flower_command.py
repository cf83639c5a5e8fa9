"""`hierfedlora flower` (hierfedlora.flower.command): its options are checked before anything starts."""

from __future__ import annotations

from hierfedlora.cli import main


def test_cli_options(tmp_path, capsys):
    assert main(["flower", "--auth"]) == 2 and "--tls" in capsys.readouterr().err
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}")
    assert main(["flower", "--out", str(out)]) == 2 and "--resume" in capsys.readouterr().err
