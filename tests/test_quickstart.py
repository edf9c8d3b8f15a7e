"""examples/quickstart.py: the clip engages on the corrupted batches and only there."""

import pathlib

from harness import script_fixture

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
quickstart = script_fixture(_SCRIPT, "quickstart")


def test_quickstart_clips_exactly_the_corrupted_batches(quickstart, capsys):
  quickstart.main(steps=31)
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
  clipped = [int(row[0]) for row in rows if row[-1] == "yes"]
  # Batches 0, 15 and 30 carry targets 50 times too large; their gradient norms exceed the clip.
  assert clipped == [0, 15, 30]
  assert all(float(row[2]) > 5.0 for row in rows if row[-1] == "yes")
