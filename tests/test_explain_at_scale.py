"""interpret.explain at scale, against real local HTTP servers (tests/fakes.py): several servers with
one dying mid-job, OpenAI batch files written and read back, workers split by SLURM and merged."""

import json
import os
import random
import subprocess
import sys
import urllib.request

from interpret import explainers, jobs, prompts, sources, topacts
import fakes

SETTINGS = jobs.JobSettings(concurrency=4, max_retries=0, backoff_s=0.01, num_images=2,
                            image_size=32)
LATENTS = list(range(7))  # latent 7 of fakes.write_topacts has no top image


def command(acts_path, out, *extra):
  return [sys.executable, "-m", "interpret.explain", f"--topacts={acts_path}", f"--out={out}",
          "--num_images=2", "--image_size=32", "--backoff_s=0.01", "--max_retries=0", *extra]


def run_command(args, env=None):
  result = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
  summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
  return result.returncode, summary, result.stderr


def explain_directly(acts_path, out):
  """The reference: one server asked directly; returns its records and the bodies it received."""
  acts = topacts.TopActs(acts_path)
  with fakes.FakeOpenAIServer() as server:
    explainer = explainers.OpenAIExplainer(server.url, None, None, timeout_s=5, max_tokens=300,
                                           temperature=0.0)
    jobs.run(acts, sources.open_table(acts, None, None), LATENTS, prompts.load_template(),
             explainer, out, SETTINGS)
  bodies = {fakes.FakeOpenAIServer.latent_of(b): b for b in server.bodies}
  return jobs.read_explanations(out), bodies


def test_servers_share_the_job_and_one_dies_midway(tmp_path):
  acts = topacts.TopActs(fakes.write_topacts(tmp_path / "topacts", num_latents=12, no_images=()))
  # The second server answers two requests, then drops the third connection and goes away.
  dying_calls = []

  def dying(latent, attempt):
    dying_calls.append(latent)
    return ("die",) if len(dying_calls) >= 3 else ("sleep", 0.05, fakes.explanation(latent))

  slow = lambda latent, attempt: ("sleep", 0.05, fakes.explanation(latent))
  with fakes.FakeOpenAIServer(slow) as alive, fakes.FakeOpenAIServer(dying) as dies:
    pool = explainers.make_explainer(
        f"openai:{alive.url},openai:{dies.url},openai:http://127.0.0.1:9/v1", None, None,
        timeout_s=5, max_tokens=50, temperature=0.0, multi_images=False, device="cpu",
        dtype="auto")
    assert [e.base_url for e in pool.endpoints] == [alive.url, dies.url]  # port 9: left out
    summary = jobs.run(acts, sources.open_table(acts, None, None), list(range(12)),
                       prompts.load_template(), pool, tmp_path / "out", SETTINGS)
  records = jobs.read_explanations(tmp_path / "out")
  assert sorted(records) == list(range(12))
  assert all(r["status"] == "ok" and r["explanation"] == f"pattern number {i}"
             for i, r in records.items())
  # No retry was spent on the dead server: its requests went straight to the live one.
  assert summary["retries"] == 0 and all(r["attempts"] == 1 for r in records.values())
  assert pool.answered == {alive.url: 10, dies.url: 2}
  assert pool.unreachable[dies.url] >= pool.max_unreachable  # left out for the rest of the job
  assert sum(alive.requests.values()) == 10
  assert pool.outstanding == {alive.url: 0, dies.url: 0}


def test_least_outstanding_server_gets_the_request(tmp_path):
  with fakes.FakeOpenAIServer() as first, fakes.FakeOpenAIServer() as second:
    pool = explainers.make_explainer(f"openai:{first.url},openai:{second.url}", None, None,
                                     timeout_s=5, max_tokens=50, temperature=0.0,
                                     multi_images=False, device="cpu", dtype="auto")
    pool.outstanding[first.url] = 3  # three requests still running there
    acts = topacts.TopActs(fakes.write_topacts(tmp_path / "topacts"))
    prompt, _ = jobs.latent_prompt(0, acts, sources.open_table(acts, None, None),
                                   prompts.load_template(), SETTINGS, pool.name)
    assert pool.complete(prompt).endswith("pattern number 0")
  assert sum(first.requests.values()) == 0 and second.requests[0] == 1


def run_batch(server, input_path, output_path, fail=(), missing=()):
  """What `vllm run-batch` does, through a real server: answers each input line, in any order."""
  lines = [json.loads(line) for line in input_path.read_text().splitlines()]
  random.Random(0).shuffle(lines)
  with open(output_path, "w") as f:
    for n, line in enumerate(lines):
      latent = int(line["custom_id"].removeprefix("latent-"))
      if latent in missing:
        continue
      row = {"id": f"batch-{n}", "custom_id": line["custom_id"], "error": None,
             "response": {"status_code": 200, "request_id": f"req-{n}", "body": None}}
      if latent in fail:
        row["response"].update(status_code=400, body={"error": {"message": "prompt too long"}})
      else:
        request = urllib.request.Request(server.url + "/chat/completions",
                                         json.dumps(line["body"]).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
          row["response"]["body"] = json.loads(response.read())
      f.write(json.dumps(row) + "\n")


def test_batch_file_round_trip_equals_asking_a_server(tmp_path):
  acts_path = fakes.write_topacts(tmp_path / "topacts")
  reference, sent = explain_directly(acts_path, tmp_path / "direct")
  out, batch_in, batch_out = tmp_path / "out", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  args = command(acts_path, out, f"--batch_file={batch_in}", f"--batch_output={batch_out}",
                 "--explainer_model=fake-model")

  code, summary, _ = run_command(args)
  assert code == 2 and summary["requests_written"] == 7 and not summary["ok"]
  written = [json.loads(line) for line in batch_in.read_text().splitlines()]
  assert [w["custom_id"] for w in written] == [f"latent-{i}" for i in LATENTS]
  assert all(w["method"] == "POST" and w["url"] == "/v1/chat/completions" for w in written)
  # Each request is the very body the server got when asked directly.
  assert [w["body"] for w in written] == [sent[i] for i in LATENTS]

  with fakes.FakeOpenAIServer() as server:
    run_batch(server, batch_in, batch_out, fail=(3,), missing=(5,))
    code, summary, _ = run_command(args)
    assert code == 2 and summary["read"] == {"failed": 1, "ok": 5}
    records = jobs.read_explanations(out)
    assert sorted(records) == [0, 1, 2, 3, 4, 6]
    assert records[3]["status"] == "failed"
    assert records[3]["error"].startswith(f"{batch_out}:") and "HTTP 400" in records[3]["error"]
    assert "prompt too long" in records[3]["error"]
    # What is left goes into the next batch: the failed latent and the missing one.
    assert [json.loads(line)["custom_id"] for line in batch_in.read_text().splitlines()] == [
        "latent-3", "latent-5"]

    run_batch(server, batch_in, batch_out)
    code, summary, _ = run_command(args)
  assert code == 0 and summary["ok"] and summary["requests_written"] == 0
  records = jobs.read_explanations(out)
  keys = ("status", "explanation", "raw", "model", "images")
  assert {i: [r[k] for k in keys] for i, r in records.items()} == {
      i: [r[k] for k in keys] for i, r in reference.items()}


def test_batch_command_needs_a_model(tmp_path):
  acts_path = fakes.write_topacts(tmp_path / "topacts")
  code, summary, _ = run_command(command(acts_path, tmp_path / "out",
                                         f"--batch_file={tmp_path / 'in.jsonl'}"))
  assert code == 1 and "--batch_file needs --explainer_model" in summary["error"]


def test_slurm_array_workers_split_and_merge(tmp_path):
  acts_path = fakes.write_topacts(tmp_path / "topacts")
  reference, _ = explain_directly(acts_path, tmp_path / "direct")
  out = tmp_path / "out"
  acts = topacts.TopActs(acts_path)
  with fakes.FakeOpenAIServer() as server:
    # Worker 0 of 2, in this process; worker 1 as SLURM array task 2 of --array=1-2.
    explainer = explainers.OpenAIExplainer(server.url, None, None, timeout_s=5, max_tokens=300,
                                           temperature=0.0)
    jobs.run(acts, sources.open_table(acts, None, None), jobs.worker_latents(LATENTS, 0, 2),
             prompts.load_template(), explainer, out, SETTINGS, jobs.worker_results(out, 0, 2))
    assert jobs.merge_workers(out, LATENTS, 2) == "worker 1: latent 1 is not finished"
    assert not (out / "explanations.jsonl").exists()
    code, summary, stderr = run_command(
        command(acts_path, out, f"--explainer=openai:{server.url}"),
        env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2",
             "SLURM_ARRAY_TASK_MIN": "1"})
  assert code == 0, stderr
  assert summary["worker_index"] == 1 and summary["merge_waits_for"] is None
  assert summary["explained"] == 3  # latents 1, 3, 5
  assert sorted(server.requests) == LATENTS and set(server.requests.values()) == {1}
  merged = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
  assert [r["latent"] for r in merged] == LATENTS
  keys = ("status", "explanation", "raw", "model", "images")
  assert {r["latent"]: [r[k] for k in keys] for r in merged} == {
      i: [r[k] for k in keys] for i, r in reference.items()}
  assert (out / "flags.worker1-of-2.json").exists()
