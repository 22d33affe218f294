"""metrics.jsonl on resume: lines after the restored step go, and a failed rewrite loses none."""

import json
import subprocess
import sys

from sae_jax.training.metrics import MetricWriter

# Reopens WORKDIR's metrics at step 1500 in a process that may not write files over 10 kB, as on a
# full disk: the rewrite of the kept lines (about 50 kB) fails midway.
REOPEN_WITH_A_FULL_DISK = """
import resource, signal, sys
from sae_jax.training.metrics import MetricWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
try:
  MetricWriter(sys.argv[1], resume_step=1500)
except OSError as e:
  print(e)
  sys.exit(3)
"""


def test_a_failed_rewrite_on_resume_loses_no_line(tmp_path):
  writer = MetricWriter(tmp_path, resume_step=0)
  for step in range(1, 2001):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  before = (tmp_path / "metrics.jsonl").read_bytes()

  failed = subprocess.run([sys.executable, "-c", REOPEN_WITH_A_FULL_DISK, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
  assert failed.returncode == 3, failed.stderr[-2000:]
  assert "File too large" in failed.stdout
  assert (tmp_path / "metrics.jsonl").read_bytes() == before

  MetricWriter(tmp_path, resume_step=1500).close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert lines == before.decode().splitlines()[:1500]
  assert [json.loads(line)["step"] for line in lines] == list(range(1, 1501))
