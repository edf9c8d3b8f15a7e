"""examples/study_own_model.py: ``clipchain.study.run`` on a user's Flax model."""

import pathlib

from harness import script_fixture

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "study_own_model.py"
example = script_fixture(_SCRIPT, "study_own_model")


def test_own_model_study_shows_the_clip_saving_sgd(example, tmp_path, capsys):
  records = example.main(["--out", str(tmp_path / "my-study")])
  assert (tmp_path / "my-study" / "report.html").is_file()
  main = [r for r in records if not r["sweep"]]
  assert {r["strategy"] for r in main} == {"none", "global", "zclip"}
  at = lambda strategy: [r for r in main if r["optimizer"] == "sgd" and r["lr"] == 0.03
                         and r["strategy"] == strategy]  # fmt: skip
  # The outlier batches blow plain SGD up in every seed; clipped at the warm-up median, it trains.
  assert len(at("none")) == 2 and all(r["diverged"] for r in at("none"))
  assert not any(r["diverged"] for r in at("global"))
  assert all(r["eval_loss"] < 1.0 for r in at("global"))
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == len(main)  # one line per main run
