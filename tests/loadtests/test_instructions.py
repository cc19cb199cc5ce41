"""loadtests.instructions: reading callgrind's counts."""

from __future__ import annotations

from pathlib import Path

from loadtests.instructions import instructions


def test_the_count_is_the_dumps_and_the_exits_and_each_file_counts_once(tmp_path: Path) -> None:
    # callgrind_control --dump writes <out>.<pid>.1; the exit writes <out>.<pid>. A file
    # may give its total as summary: and as totals:, the same number.
    (tmp_path / "metergate-1w.callgrind.41.1").write_text(
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 1200\ntotals: 1200\n"
    )
    (tmp_path / "metergate-1w.callgrind.41").write_text("events: Ir\nsummary: 34\n")
    (tmp_path / "metergate-off.callgrind.40.1").write_text("events: Ir\ntotals: 999\n")
    assert instructions(tmp_path, "metergate-1w.callgrind") == 1234
    assert instructions(tmp_path, "metergate-off.callgrind") == 999
    assert instructions(tmp_path, "absent.callgrind") == 0
