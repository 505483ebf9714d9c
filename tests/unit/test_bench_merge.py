"""bench --merge: a rerun of some scenarios replaces theirs and says so; nothing else moves."""
from __future__ import annotations

from bench.__main__ import markdown, merge


def _doc(at: str, scenarios: dict[str, float]) -> dict:
    fig = lambda v: {"metric": "m", "unit": "s", "x2x": v, "peer_name": "p", "peer": 1.0,  # noqa: E731
                     "ratio": v, "better": "lower"}
    return {"meta": {"quick": False, "at": at, "wall_seconds": 9.0, "machine": "M", "cpus": 2,
                     "broker": "kafka: K; one partition per topic", "ratio": "r",
                     "broker_warm_up": {}},
            "scenarios": {k: {"title": k, "figures": [fig(v)]} for k, v in scenarios.items()}}


def test_a_merged_rerun_replaces_its_scenarios_in_place_and_is_named():
    base = _doc("T1", {"pipeline": 1.0, "lag": 2.0, "memory": 3.0})
    out = merge(base, _doc("T2", {"lag": 0.5, "lag@tansu": 0.7}))
    assert list(out["scenarios"]) == ["pipeline", "lag", "memory", "lag@tansu"]
    assert out["scenarios"]["lag"]["figures"][0]["x2x"] == 0.5
    assert out["scenarios"]["pipeline"] == base["scenarios"]["pipeline"]
    assert out["meta"]["at"] == "T1"
    assert [r["scenarios"] for r in out["meta"]["reruns"]] == [["lag", "lag@tansu"]]
    again = merge(out, _doc("T3", {"memory": 1.5}))
    assert [r["at"] for r in again["meta"]["reruns"]] == ["T2", "T3"]
    assert "Rerun at T2, on brokers of their own (warmed as above): lag, lag@tansu." \
        in markdown(out)
