"""`--trace FILE`: every rank's steps as Chrome trace events in one file rank 0 writes: well
formed, each step's phases nested in the step, each bucket's allreduce on its own lane, and with
--overlap on the allreduces starting while backward still runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers.trainruns import ok, train, write_data

LANES = {0: "step: compute", 1: "step: allreduce", 2: "validation, checkpoints"}
PHASES = {"data", "forward", "backward layer 1", "backward layer 2", "backward layer 3",
          "wait for the allreduce", "update"}
OPTS = ("--layers", "8,64,32,3", "--dtype", "float64", "--batch-size", "16", "--steps", "12",
        "--checkpoint-every", "5")


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("trace")
    data = write_data(d / "d.h5", 60)
    ok(train(2, data, d / "run", *OPTS, "--val-fraction", "0.2", "--overlap", "on",
             "--bucket-mb", "0.00001", "--trace", str(d / "trace.json")))
    return json.loads((d / "trace.json").read_text())


def spans(trace: dict, pid: int, tid: int) -> list[dict]:
    return sorted((e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == pid
                   and e["tid"] == tid), key=lambda e: e["ts"])


def test_the_trace_is_well_formed_and_names_every_rank_and_lane(traced):
    events = traced["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X"}
    for e in events:
        if e["ph"] == "X":
            assert e["pid"] in (0, 1) and e["tid"] in LANES and e["name"]
            assert e["ts"] >= 0 and e["dur"] >= 0
    names = {(e["pid"], e["tid"], e["args"]["name"]) for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {(p, t, n) for p in (0, 1) for t, n in LANES.items()}
    procs = [e["args"]["name"] for e in events if e["name"] == "process_name"]
    assert sorted(p.split(" (")[0] for p in procs) == ["rank 0", "rank 1"]


@pytest.mark.parametrize("rank", [0, 1])
def test_each_steps_phases_lie_inside_it_in_order(traced, rank):
    compute = spans(traced, rank, 0)
    steps = [e for e in compute if e["name"].startswith("step ")]
    assert [e["name"] for e in steps] == [f"step {n}" for n in range(1, 13)]
    for step in steps:
        end = step["ts"] + step["dur"]
        inside = [e for e in compute if not e["name"].startswith("step ")
                  and step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= end + 1e-3]
        assert {e["name"] for e in inside} == PHASES
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(inside, inside[1:]))
        order = [e["name"] for e in inside]
        assert order == ["data", "forward", "backward layer 3", "backward layer 2",
                         "backward layer 1", "wait for the allreduce", "update"]


def test_with_overlap_the_buckets_allreduces_start_while_backward_runs(traced):
    compute, comm = spans(traced, 0, 0), spans(traced, 0, 1)
    assert {e["name"] for e in comm} == {"allreduce of layer 3", "allreduce of layer 2",
                                         "allreduce of layer 1"}
    assert len(comm) == 3 * 12
    last_layer = [e for e in compute if e["name"] == "backward layer 1"]
    first_buckets = [e for e in comm if e["name"] == "allreduce of layer 3"]
    for layer1, bucket in zip(last_layer, first_buckets):
        assert bucket["ts"] <= layer1["ts"]  # started before backward's last layer began
    # a layer's bucket starts once its ΔW and Δb are written, before its δ goes down
    for layer in (3, 2):
        backward = [e for e in compute if e["name"] == f"backward layer {layer}"]
        buckets = [e for e in comm if e["name"] == f"allreduce of layer {layer}"]
        for b, bucket in zip(backward, buckets):
            assert b["ts"] <= bucket["ts"] < b["ts"] + b["dur"]


def test_the_timeline_script_draws_a_trace_and_refuses_what_is_none(traced, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "trace_timeline.py")]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(traced))
    done = subprocess.run([*script, str(trace), str(tmp_path / "t.png"), "--steps", "3:6"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args, message in (([str(trace), str(tmp_path / "u.png"), "--steps", "40:45"],
                           "no step in 40..44"),
                          ([str(ROOT / "README.md"), str(tmp_path / "v.png")],
                           "not a distbp trace")):
        done = subprocess.run([*script, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_validation_and_checkpoints_are_on_their_own_lane(traced):
    names = [e["name"] for e in spans(traced, 0, 2)]
    assert "validation" in names and names.count("checkpoint") == 3  # steps 5, 10 and 12
    assert set(names) == {"validation", "checkpoint"}


def test_a_trace_into_an_input_or_a_missing_directory_is_refused(tmp_path):
    data = write_data(tmp_path / "d.h5", 60)
    for target, phrase in ((data, "is the --data"), (tmp_path / "no" / "t.json", "does not exist")):
        proc = train(2, data, tmp_path / "run", *OPTS, "--trace", str(target))
        assert proc.returncode == 2, proc.stderr
        assert phrase in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
