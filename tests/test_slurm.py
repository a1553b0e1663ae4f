"""A real two-node Slurm cluster on this machine runs `plait-launch launch=slurm`.

The fixture starts munge, slurmctld and two slurmd (node1, node2 on 127.0.0.1, each on
its own free port) in a temp directory, with no systemd, and stops them afterwards. The
test submits the tiny model, tp=2 x dp=2 on 2 nodes x 2 processes, for 20 steps, waits for
the job, and checks that it finished, that 4 ranks took part, and that metrics and a
checkpoint were written. Skips only when Slurm's daemons are not installed
(CI: `apt-get install -y slurm-wlm`).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from dist_utils import free_port

pytestmark = pytest.mark.slow

SLURM_CONF = """ClusterName=plaitci
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
SlurmctldPort={ctld_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=2 RealMemory=4000
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=2 RealMemory=4000
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class LocalSlurm:
    """munge + slurmctld + slurmd x 2 under `root`; `env` points Slurm's clients at it."""

    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def _run(self, *command, check=True):
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def start(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(root / "munge", "munge", "munge")
        os.chmod(root / "munge", 0o755)  # munged: the socket directory must be searchable by all
        (root / "slurm.conf").write_text(SLURM_CONF.format(
            host=socket.gethostname(), root=root, ctld_port=free_port(), port1=free_port(), port2=free_port()))
        self._run("runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={root}/munge/munge.socket",
                  f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                  f"--seed-file={root}/munge/munged.seed")
        self._run("slurmctld", "-i")
        self._run("slurmd", "-N", "node1")
        self._run("slurmd", "-N", "node2")
        deadline = time.monotonic() + 60
        while self._run("sinfo", "-h", "-o", "%D %t", check=False).stdout.strip() != "2 idle":
            if time.monotonic() > deadline:
                raise RuntimeError("the local Slurm cluster did not come up:\n" + self.logs())
            time.sleep(0.5)

    def stop(self) -> None:
        for name in ("slurmd-node1.pid", "slurmd-node2.pid", "slurmctld.pid", "munge/munged.pid"):
            pid = _pid(self.root / name)
            if pid:
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in (self.root / "log").glob("*.log"))

    def job_state(self, job_id: str) -> str:
        out = self._run("scontrol", "show", "job", job_id, check=False).stdout
        match = re.search(r"JobState=(\S+)", out)
        return match.group(1) if match else "UNKNOWN"

    def wait(self, job_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
                return state
            time.sleep(1.0)
        return "TIMEOUT"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged")):
        pytest.skip("slurmctld/slurmd/munged are not installed (apt-get install -y slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd runs jobs as their users)")
    # munged runs as the munge user: its directory's parents must be traversable (pytest's
    # own temp root is 0700), and the socket path must stay short (sockaddr_un)
    root = Path(tempfile.mkdtemp(prefix="plait-slurm-"))
    os.chmod(root, 0o755)
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)


def test_slurm_job_trains_tiny_model_on_two_nodes(slurm_cluster, tmp_path, stdlib_tokens):
    run_dir, out_dir = tmp_path / "run", tmp_path / "slurm"
    cache = str(Path(stdlib_tokens[0]).parent)
    env = dict(slurm_cluster.env, OMP_NUM_THREADS="1", PLAIT_CACHE=cache, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "plait.train.launch_cli", "launch=slurm", "launch.nodes=2",
               "launch.procs_per_node=2", f"launch.output_dir={out_dir}", f"launch.rdzv_port={free_port()}",
               "launch.time=00:10:00", "parallel.tp=2", "model=tiny", "train.steps=20", "train.batch_size=4",
               "train.seq_len=64", "train.eval_every=0", "train.log_every=5", "train.peak_flops=1e12",
               "train.progress=false", "train.threads=1", f"data.cache_dir={cache}", f"train.run_dir={run_dir}",
               "checkpoint.every=10"]
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    state = slurm_cluster.wait(job_id, timeout=400)
    log = (out_dir / f"plait-{job_id}.out")
    log_text = log.read_text() if log.exists() else "(no job log)"
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{log_text[-4000:]}\n{slurm_cluster.logs()}"
    # 4 ranks took part: rank 0 logs the layout it joined
    assert "world 4 = tp 2 x dp 2 x pp 1" in log_text, log_text[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 20
    assert any(run_dir.rglob("*.safetensors")), sorted(str(p) for p in run_dir.rglob("*"))
    # the job held both nodes (one torchrun per node, 2 workers each)
    job = slurm_cluster._run("scontrol", "show", "job", job_id).stdout
    assert re.search(r"NumNodes=2\b", job) and "NodeList=node[1-2]" in job, job


def _steps_logged(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, stdlib_tokens):
    """USR1 to the batch script (Slurm's --signal warning) -> SIGTERM to the step -> every rank
    finishes its step, checkpoints and exits; the script requeues the job; the requeued job
    resumes from that checkpoint (same job id, same run dir) and completes."""
    run_dir, out_dir = tmp_path / "run", tmp_path / "slurm"
    cache = str(Path(stdlib_tokens[0]).parent)
    env = dict(slurm_cluster.env, OMP_NUM_THREADS="1", PLAIT_CACHE=cache, PYTHONUNBUFFERED="1")
    steps = 40
    command = [sys.executable, "-m", "plait.train.launch_cli", "launch=slurm", "launch.nodes=2",
               "launch.procs_per_node=1", f"launch.output_dir={out_dir}", f"launch.rdzv_port={free_port()}",
               "launch.time=00:10:00", "launch.job_name=preempt", "model=tiny", f"train.steps={steps}",
               "train.batch_size=4", "train.seq_len=64", "train.eval_every=0", "train.log_every=1",
               "train.peak_flops=1e12", "train.progress=false", "train.threads=1", f"data.cache_dir={cache}",
               f"train.run_dir={run_dir}", "train.resume=auto"]
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    deadline = time.monotonic() + 300
    while len(_steps_logged(run_dir)) < 2 and time.monotonic() < deadline:
        assert slurm_cluster.job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING"), slurm_cluster.job_state(job_id)
        time.sleep(0.5)
    slurm_cluster._run("scancel", "--batch", "--signal=USR1", job_id)  # what --signal=B:USR1@T sends
    deadline = time.monotonic() + 300
    log = out_dir / f"preempt-{job_id}.out"
    while "requeueing" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.5)
    stopped_at = len(_steps_logged(run_dir))
    # a requeued job waits cred_expire before it may start again (slurm.conf above sets 10 s;
    # moving its start time earlier raced the credential revocation: "Job credential revoked")
    state = slurm_cluster.wait(job_id, timeout=400)
    text = log.read_text() if log.exists() else "(no job log)"
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{text[-5000:]}\n{slurm_cluster.logs()}"
    assert "requeueing job" in text
    assert text.count(f"plait: job {job_id} on") == 2  # the same job ran twice
    logged = _steps_logged(run_dir)
    # the first run stopped at a step boundary with a checkpoint; the second resumed right after it
    assert stopped_at < steps and logged[-1] == steps
    assert logged == list(range(1, stopped_at + 1)) + list(range(stopped_at + 1, steps + 1)), logged
    assert any(run_dir.rglob("*.safetensors"))
