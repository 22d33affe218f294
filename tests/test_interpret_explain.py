"""Batch explanations against a real local HTTP server: retries, parse failures, cache, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from interpret import jobs, prompts, sources, topacts
from interpret.explainers import ExplainerError, OpenAIExplainer
import fakes

SETTINGS = jobs.JobSettings(concurrency=4, max_retries=2, backoff_s=0.01, num_images=2, image_size=32)


@pytest.fixture
def acts(tmp_path):
  return topacts.TopActs(fakes.write_topacts(tmp_path / "topacts"))


def explain(acts, server, out, latents=range(8), timeout_s=5.0, settings=SETTINGS,
            template=None):
  chosen, _ = topacts.select_latents(acts, ",".join(map(str, latents)))
  explainer = OpenAIExplainer(server.url, None, "sk-test", timeout_s=timeout_s, max_tokens=50,
                              temperature=0.0)
  table = sources.open_table(acts, None, None)
  return jobs.run(acts, table, chosen, template or prompts.load_template(), explainer, out,
                  settings)


def prefilled_template(tmp_path):
  """The default template plus an [assistant] section: the answer starts with the tag."""
  path = tmp_path / "prefilled.txt"
  path.write_text(prompts.DEFAULT_TEMPLATE.read_text() + "[assistant]\n[EXPLANATION]:\n")
  return prompts.load_template(path)


def read_records(out):
  return [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]


def script(latent, attempt):
  if latent == 1 and attempt == 1:
    return ("status", 500)
  if latent == 2 and attempt == 1:
    return ("sleep", 2.5, fakes.explanation(2))  # longer than the client's timeout
  if latent == 3:
    return fakes.reply("I see blue things but will not follow the format.")
  if latent == 4:
    return fakes.reply("Hmm.\n[EXPLANATION]: Unable to produce descriptions")
  if latent == 5:
    return ("status", 503)  # never recovers: failed after max_retries
  if latent == 6 and attempt == 1:
    return ("garbage",)
  return fakes.reply(fakes.explanation(latent))


def test_retries_parse_failures_and_cache(acts, tmp_path):
  out = tmp_path / "out"
  with fakes.FakeOpenAIServer(script) as server:
    summary = explain(acts, server, out, timeout_s=1.0)
    records = {r["latent"]: r for r in read_records(out)}
    assert sorted(records) == [0, 1, 2, 3, 4, 5, 6]  # 7 has no top image: skipped
    status = {i: r["status"] for i, r in records.items()}
    assert status == {0: "ok", 1: "ok", 2: "ok", 3: "parse_error", 4: "unable", 5: "failed", 6: "ok"}
    assert records[1]["explanation"] == "pattern number 1" and records[1]["attempts"] == 2
    assert records[2]["attempts"] == 2 and records[6]["attempts"] == 2
    assert "HTTP 503" in records[5]["error"] and records[5]["raw"] is None
    assert records[3]["raw"].startswith("I see blue") and records[3]["explanation"] is None
    assert records[0]["model"] == "fake-model" and records[0]["images"] == [0, 1]
    assert server.requests[5] == SETTINGS.max_retries + 1
    assert summary["by_status"] == {"failed": 1, "ok": 4, "parse_error": 1, "unable": 1}
    assert summary["retries"] == 3 + SETTINGS.max_retries
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    parts = server.bodies[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")

    # Rerun: only the failed latent is asked again (and fails again).
    before = dict(server.requests)
    summary = explain(acts, server, out)
    assert summary["already_finished"] == 6 and summary["explained"] == 1
    assert {i: n - before[i] for i, n in server.requests.items() if n != before[i]} == {5: 3}

    # Lost explanations.jsonl: every answer that was received comes from the cache.
    (out / "explanations.jsonl").unlink()
    before = dict(server.requests)
    summary = explain(acts, server, out)
    assert summary["cache_hits"] == 6
    assert {i for i, n in server.requests.items() if n != before[i]} == {5}
    assert {r["latent"]: r["status"] for r in read_records(out)} == status


def test_answer_prefix_is_sent_for_continuation_and_kept_in_the_answer(acts, tmp_path):
  with fakes.FakeOpenAIServer(lambda latent, attempt: fakes.reply(f" blobs {latent}")) as server:
    explain(acts, server, tmp_path / "out", latents=[0, 1], template=prefilled_template(tmp_path))
  body = server.bodies[0]
  assert body["messages"][-1] == {"role": "assistant", "content": "[EXPLANATION]:"}
  assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
  records = {r["latent"]: r for r in read_records(tmp_path / "out")}
  assert records[1]["raw"] == "[EXPLANATION]: blobs 1"
  assert records[1]["status"] == "ok" and records[1]["explanation"] == "blobs 1"


def test_truncated_last_line_is_dropped(acts, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  finished = {"latent": 0, "status": "ok", "explanation": "x"}
  (out / "explanations.jsonl").write_text(json.dumps(finished) + "\n" + '{"latent": 1, "sta')
  with fakes.FakeOpenAIServer() as server:
    summary = explain(acts, server, out, latents=[0, 1, 2])
  assert summary["already_finished"] == 1 and set(server.requests) == {1, 2}
  assert [r["latent"] for r in read_records(out)][0] == 0 and len(read_records(out)) == 3


GOOD = {"latent": 0, "status": "ok", "explanation": "x"}


@pytest.mark.parametrize("line, why", [
    (b'{"latent": 1, "explanation": "y"}', 'missing key "status"'),
    (b'{"latent": 1.5, "status": "ok", "explanation": "y"}', '"latent" must be an integer'),
    (b'{"latent": 1, "status": "ok", "explanation": 42}', '"explanation" must be a string'),
    (b'{"latent": 1, "status": "ok"}', 'status "ok" needs an "explanation"'),
    (b'{"latent": 1, "status": "done", "explanation": "y"}', 'status \'done\' is not one of'),
    (b'["latent", 1]', "expected a JSON object"),
    (b'{"latent": 1, "status": "ok", "explanation": "caf\xe9"}', "not UTF-8"),
    (b'{"latent": 1, "status": "ok",', "not JSON"),
])
def test_reader_names_the_file_and_line_of_a_bad_record(tmp_path, line, why):
  path = tmp_path / "explanations.jsonl"
  good = json.dumps(GOOD).encode() + b"\n"
  path.write_bytes(good + line + b"\n" + good)
  for repair in (False, True):  # a complete line is never taken for a write cut short
    with pytest.raises(jobs.ResultsError) as error:
      jobs.read_explanations(path, repair=repair)
    message = str(error.value)
    assert message.startswith(f"{path}:2: ") and why in message and "\n" not in message


def test_reader_keeps_a_complete_last_line_without_newline(tmp_path):
  path = tmp_path / "explanations.jsonl"
  path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "latent": 1}))
  assert sorted(jobs.read_explanations(path)) == [0, 1]


def test_reader_reports_a_last_line_cut_short(tmp_path):
  path = tmp_path / "explanations.jsonl"
  path.write_text(json.dumps(GOOD) + "\n" + '{"latent": 1, "sta')
  with pytest.raises(jobs.ResultsError) as error:
    jobs.read_explanations(path)  # a reader does not guess: the job may still be writing it
  assert str(error.value).startswith(f"{path}:2: not JSON") and "killed job" in str(error.value)
  assert sorted(jobs.read_explanations(path, repair=True)) == [0]
  assert path.read_text() == json.dumps(GOOD) + "\n"  # cut off: the next append starts a line


def test_reader_takes_the_jobs_folder_and_names_a_missing_file(tmp_path):
  (tmp_path / "explanations.jsonl").write_text(json.dumps(GOOD) + "\n")
  assert list(jobs.read_explanations(tmp_path)) == [0]  # the --out folder of interpret.explain
  with pytest.raises(jobs.ResultsError, match="cannot read .*gone.jsonl: No such file"):
    jobs.read_explanations(tmp_path / "gone.jsonl")


def test_resume_keeps_a_complete_last_line_without_newline(acts, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "explanations.jsonl").write_text(json.dumps(GOOD))
  with fakes.FakeOpenAIServer() as server:
    summary = explain(acts, server, out, latents=[0, 1])
  assert summary["already_finished"] == 1 and set(server.requests) == {1}
  assert [r["latent"] for r in read_records(out)] == [0, 1]


def test_resume_stops_at_a_malformed_complete_line(acts, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "explanations.jsonl").write_text(json.dumps(GOOD) + '\n{"latent": 1}\n')
  with fakes.FakeOpenAIServer() as server:
    with pytest.raises(jobs.ResultsError, match=r"explanations.jsonl:2: missing key \"status\""):
      explain(acts, server, out, latents=[0, 1])
  assert not server.requests


def test_grid_layout_sends_one_image(acts, tmp_path):
  settings = jobs.JobSettings(concurrency=2, num_images=3, image_size=32, grid=True)
  with fakes.FakeOpenAIServer() as server:
    explain(acts, server, tmp_path / "out", latents=[0, 1], settings=settings)
  parts = server.bodies[0]["messages"][1]["content"]
  assert [p["type"] for p in parts] == ["text", "image_url"] and "shown 3 images" in parts[0]["text"]
  assert {r["status"] for r in read_records(tmp_path / "out")} == {"ok"}


@pytest.mark.parametrize("model", [None, "named-model"])
def test_unreachable_server_is_a_clear_error(model):
  with pytest.raises(ExplainerError, match="unreachable") as error:
    OpenAIExplainer("http://127.0.0.1:9/v1", model, None, timeout_s=1, max_tokens=5, temperature=0)
  assert error.value.fatal


def test_wrong_key_stops_the_job(acts, tmp_path):
  with fakes.FakeOpenAIServer(lambda latent, attempt: ("status", 401)) as server:
    with pytest.raises(ExplainerError, match="HTTP 401"):
      explain(acts, server, tmp_path / "out")


def command(server, out, acts_path, *extra):
  return [sys.executable, "-m", "interpret.explain", f"--topacts={acts_path}",
          f"--explainer=openai:{server.url}", "--explainer_model=fake-model", f"--out={out}",
          "--num_images=2", "--image_size=32", "--backoff_s=0.01", *extra]


def test_command_kill_and_resume(tmp_path):
  acts_path = fakes.write_topacts(tmp_path / "topacts")
  out = tmp_path / "out"
  env = {**os.environ, "MY_KEY": "sk-very-secret"}
  slow = lambda latent, attempt: ("sleep", 0.4, fakes.explanation(latent))
  with fakes.FakeOpenAIServer(slow) as server:
    process = subprocess.Popen(command(server, out, acts_path, "--concurrency=1",
                                       "--api_key_env=MY_KEY"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "explanations.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_run = {r["latent"] for r in read_records(out)}
    assert 2 <= len(first_run) < 7
    requested_before = dict(server.requests)

    result = subprocess.run(command(server, out, acts_path, "--concurrency=3", "--latents=0-7",
                                    "--api_key_env=MY_KEY"),
                            env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["ok"] and summary["skipped_no_images"] == 1
  assert summary["already_finished"] == len(first_run)
  for latent in first_run:  # finished latents are not requested again
    assert server.requests[latent] == requested_before[latent] == 1
  records = read_records(out)
  assert sorted(r["latent"] for r in records) == list(range(7))  # no duplicates, nothing lost
  assert all(r["status"] == "ok" for r in records)
  saved = (out / "flags.json").read_text()
  assert json.loads(saved)["api_key_env"] == "MY_KEY"
  assert "sk-very-secret" not in saved + result.stdout + result.stderr
  assert server.headers[-1]["Authorization"] == "Bearer sk-very-secret"


def test_command_reports_bad_flags(tmp_path):
  acts_path = fakes.write_topacts(tmp_path / "topacts")
  with fakes.FakeOpenAIServer() as server:
    result = subprocess.run(command(server, tmp_path / "out", acts_path, "--latents=3-x"),
                            capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert "--latents" in json.loads(result.stdout.strip().splitlines()[-1])["error"]


def test_hf_explainer_tiny_onevision(acts, tmp_path, tiny_model):
  from interpret.explainers import make_explainer
  explainer = make_explainer(f"hf:{tiny_model('llava_onevision')}", None, None, timeout_s=1,
                             max_tokens=6, temperature=0, multi_images=False, device="cpu",
                             dtype="float32")
  table = sources.open_table(acts, None, None)
  out = tmp_path / "out"
  summary = jobs.run(acts, table, [0, 3], prompts.load_template(), explainer, out, SETTINGS)
  records = read_records(out)
  assert summary["explained"] == 2 and [r["latent"] for r in sorted(records, key=lambda r: r["latent"])] == [0, 3]
  for record in records:  # gibberish from random weights: recorded, never fatal
    assert record["status"] in ("parse_error", "unable", "ok")
    assert isinstance(record["raw"], str) and record["status"] == prompts.parse_explanation(record["raw"])[0]
  rerun = jobs.run(acts, table, [0, 3], prompts.load_template(), explainer, out, SETTINGS)
  assert rerun["explained"] == 0
  # With the answer prefilled, even an untrained model answers in the format.
  jobs.run(acts, table, [0, 3], prefilled_template(tmp_path), explainer, tmp_path / "prefilled",
           SETTINGS)
  for record in read_records(tmp_path / "prefilled"):
    assert record["raw"].startswith("[EXPLANATION]:") and record["status"] in ("ok", "unable")


def test_command_exit_status_when_latents_fail(tmp_path):
  acts_path = fakes.write_topacts(tmp_path / "topacts")
  with fakes.FakeOpenAIServer(lambda latent, attempt: ("status", 500)) as server:
    result = subprocess.run(command(server, tmp_path / "out", acts_path, "--max_retries=0",
                                    "--latents=0-1"), capture_output=True, text=True, timeout=60)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert result.returncode == 2 and not summary["ok"] and summary["by_status"] == {"failed": 2}
