"""Heartbeats: what the writer puts on disk, both readers of it (a directory; `cat` output over
ssh), and the rule that calls a process stalled."""

import json
import os
import subprocess
import time

import pytest

from zoo.train.heartbeat import Heartbeat, beat_path, parse, read_dir, stalled_for


def test_from_env_writes_beats_that_read_dir_reads(tmp_path, monkeypatch):
  directory = tmp_path / "beats"
  monkeypatch.setenv("ZOO_HEARTBEAT_DIR", str(directory))
  beats = Heartbeat.from_env()  # process 0: one process in tests
  before = time.time()
  beats.beat(3)
  beats.beat(4)
  after = time.time()
  assert sorted(os.listdir(directory)) == ["process_0.json"]  # no temporary file left
  with open(directory / "process_0.json") as f:
    on_disk = json.load(f)
  assert on_disk["step"] == 4 and on_disk["pid"] == os.getpid() and not on_disk["done"]
  assert before <= on_disk["time"] <= after
  assert read_dir(str(directory), 2) == [on_disk, None]  # process 1 has not beaten yet
  beats.beat(5, done=True)
  assert read_dir(str(directory), 1)[0]["done"] is True


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.delenv("ZOO_HEARTBEAT_DIR", raising=False)
  monkeypatch.chdir(tmp_path)
  Heartbeat.from_env().beat(1)
  assert os.listdir(tmp_path) == []


def test_an_unreadable_beat_counts_as_none(tmp_path):
  Heartbeat(beat_path(str(tmp_path), 0), 0).beat(7)
  (tmp_path / "process_1.json").write_text('{"step": 2, "ti')
  assert [b and b["step"] for b in read_dir(str(tmp_path), 3)] == [7, None, None]


def cat_beats(directory) -> str:
  """What a worker prints for the watchdog's `cat DIR/process_*.json`."""
  return subprocess.run(["bash", "-c", f"cat {directory}/process_*.json"], capture_output=True,
                        text=True).stdout


def test_parse_reads_cat_output_of_several_workers(tmp_path):
  # three workers, each with its own directory; gcloud prints their output in any order,
  # with whatever else the command printed around it
  for i, step in enumerate([11, 12, 13]):
    os.makedirs(tmp_path / f"w{i}")
    Heartbeat(beat_path(str(tmp_path / f"w{i}"), i), i).beat(step)
  text = ("Warning: {ssh} key for worker 2\n" + cat_beats(tmp_path / "w2")
          + cat_beats(tmp_path / "w0") + "RUNNING\n" + cat_beats(tmp_path / "w1"))
  beats = parse(text, 4)
  assert [b and b["step"] for b in beats] == [11, 12, 13, None]
  assert [b and b["process"] for b in beats[:3]] == [0, 1, 2]
  assert beats[:3] == [json.loads((tmp_path / f"w{i}" / f"process_{i}.json").read_text())
                       for i in range(3)]


def test_parse_places_beats_without_a_process_in_order():
  # beats written before they named their process: {step, time, pid, done}
  old = [{"step": s, "time": 100.0 + s, "pid": 40 + s, "done": False} for s in (5, 6)]
  text = "".join(json.dumps(b) for b in old) + "RUNNING\n"
  assert parse(text, 3) == [*old, None]
  assert parse("", 2) == [None, None]
  assert parse("RUNNING\n", 1) == [None]


STARTED = 1000.0
TIMEOUTS = dict(heartbeat_timeout=60.0, startup_timeout=600.0)


@pytest.mark.parametrize("beat_time,now,expected", [
  (None, STARTED + 599, None),  # no beat yet: still starting up
  (None, STARTED + 601, 601),
  (STARTED + 700, STARTED + 759, None),  # after a beat: the heartbeat timeout, from it
  (STARTED + 700, STARTED + 770, 70),
  (STARTED + 1, STARTED + 62, 61),  # a first beat ends the startup allowance
])
def test_stalled_for(beat_time, now, expected):
  beat = None if beat_time is None else {"step": 1, "time": beat_time, "pid": 1, "done": False}
  assert stalled_for(beat, started=STARTED, now=now, **TIMEOUTS) == expected
