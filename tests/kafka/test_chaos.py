"""A short chaos soak (benchmarks/chaos.py): about twenty SIGKILLs of the stages and the online
trainer, two broker restarts and poison records on every input topic, on a real broker. Nothing
may be lost or trained twice, and every poison record must reach its dead-letter topic with its
headers. The ten-minute run and its figures are in docs/reliability.md."""

from __future__ import annotations

import pytest

from benchmarks import chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(900)
def test_a_short_soak_loses_nothing_and_trains_nothing_twice(default_model, tmp_path):
    args = chaos.parser().parse_args(
        [
            "--duration-s", "60", "--kill-every-s", "3", "--broker-restart-every-s", "25",
            "--poison-every-s", "4", "--prompts-per-s", "3", "--settle-s", "300", "--seed", "3",
            "--model-cache", str(tmp_path / "tiny-model"), "--out", str(tmp_path / "chaos.json"),
        ]
    )  # fmt: skip
    result = chaos.soak(args)
    summary = chaos.table(result)
    assert sum(c["kills"] for c in result["components"].values()) >= 19, summary
    assert result["broker_restarts"] == 2, summary
    assert result["prompts_pushed"] > 0 and result["prompts_lost"] == 0, summary
    assert result["preferences_trained_twice"] == 0, summary
    assert result["preferences_not_trained"] == 0, summary
    for topic, letters in result["dead_letters"].items():
        assert letters["got"] == letters["expected"] and letters["headers_complete"], (topic, summary)


@pytest.mark.timeout(900)
def test_the_soak_runs_on_the_default_model(default_model, tmp_path):
    """The same guarantees with every stage and the trainer on the real model (two kills)."""
    args = chaos.parser().parse_args(
        [
            "--model", default_model, "--duration-s", "20", "--kill-every-s", "8",
            "--broker-restart-every-s", "1000", "--poison-every-s", "9", "--prompts-per-s", "0.2",
            "--settle-s", "600", "--seed", "2", "--out", str(tmp_path / "chaos.json"),
        ]
    )  # fmt: skip
    result = chaos.soak(args)
    summary = chaos.table(result)
    assert sum(c["kills"] for c in result["components"].values()) == 2, summary
    assert result["prompts_pushed"] > 0 and result["prompts_lost"] == 0, summary
    assert result["preferences_trained_twice"] == 0 and result["preferences_not_trained"] == 0, summary
    for topic, letters in result["dead_letters"].items():
        assert letters["got"] == letters["expected"] and letters["headers_complete"], (topic, summary)
