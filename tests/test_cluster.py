"""Real Slurm and SSH: the machine_examples run as Slurm jobs on a private single-node cluster.

tests/cluster/start.sh installs (apt-get, only what is missing) and starts munged, slurmctld,
slurmd and an sshd on 127.0.0.1 with keys made on the spot; the module fixture starts it once and
stops it at the end (tests/cluster/stop.sh). Where the cluster cannot start (no root, no apt-get,
no network for the packages...), the whole module is skipped with start.sh's one-line reason.

The machine.json files are machine_examples/slurm.json and ssh_slurm.json with only what cannot
exist on this host swapped (`for_this_host`): the partition, 1 CPU instead of 8/64, no GPU, no
environment modules, this venv's activate script, --mem, OMP_NUM_THREADS=1 (2 shared cores), the
remote dir and the SSH host/port/key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from conftest import BIN, make_param, write_inputs
from test_train import check_models, train_only

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "machine_examples"
SCRIPTS = HERE / "cluster"
STATE = Path(os.environ.get("SPINGEN_CLUSTER_DIR", "/tmp/spingen-cluster"))


# ---------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def cluster(request):
    """Start the private Slurm + sshd (or reuse one already started), yield its settings, stop it."""
    try:
        start = subprocess.run(["bash", str(SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        start = subprocess.CompletedProcess([], 1, "", "start.sh took more than 10 min (apt-get without network?)")
    if start.returncode != 0:
        lines = start.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"start.sh exited with {start.returncode} and said nothing"
        message = f"no Slurm/SSH test cluster, tests/test_cluster.py skipped: {reason}"
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # shown even under -q, without -rs
            print(f"\n{message}", file=sys.stderr)
        pytest.skip(message)
    reused = "already running" in start.stdout
    env = {}
    for line in (STATE / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # SLURM_CONF for sbatch/squeue/scancel run by dpdispatcher
        try:
            yield env
        finally:
            if not reused:  # a cluster that was already up belongs to whoever started it
                subprocess.run(["bash", str(SCRIPTS / "stop.sh")], capture_output=True, text=True, timeout=120)


def for_this_host(example: str, cluster: dict, remote_root: str, **commands) -> dict:
    """machine_examples/<example> with only what cannot exist on this host swapped."""
    machine = json.loads((EXAMPLES / example).read_text())
    for name in ("train", "model_devi", "fp"):
        section = machine[name][0] if isinstance(machine[name], list) else machine[name]
        mach, res = section["machine"], section["resources"]
        assert mach["batch_type"] == "Slurm", f"{example} is a Slurm example"
        mach["remote_root"] = remote_root
        if "remote_profile" in mach:
            mach["remote_profile"].update(hostname=cluster["SPINGEN_CLUSTER_SSH_HOST"],
                                          port=int(cluster["SPINGEN_CLUSTER_SSH_PORT"]),
                                          username=cluster["SPINGEN_CLUSTER_SSH_USER"],
                                          key_filename=cluster["SPINGEN_CLUSTER_SSH_KEY"])
        res["queue_name"] = cluster["SPINGEN_CLUSTER_PARTITION"]
        res["cpu_per_node"] = 1  # this node has nproc CPUs, not 8 or 64
        res["gpu_per_node"] = 0
        res.pop("module_list", None)  # no environment modules here
        if "source_list" in res:
            res["source_list"] = [str(BIN / "activate")]
        res.setdefault("envs", {}).setdefault("OMP_NUM_THREADS", 1)  # 2 shared cores: no thread pools
        res["custom_flags"] = [flag.replace("--mem=32G", "--mem=1G") for flag in res.get("custom_flags", [])]
        section["check_interval"] = 1
        if name in commands:
            section["command"] = commands[name]
    return machine


def slurm_jobs(cluster: dict, under: Path, timeout: float = 10) -> list[dict]:
    """The jobs Slurm ran with a work dir under `under`, from slurmctld's job completion log."""
    records = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = []
        for line in Path(cluster["SPINGEN_CLUSTER_JOBCOMP"]).read_text().splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields.get("WorkDir", "").startswith(str(under)):
                records.append(fields)
        if records:
            break
        time.sleep(0.5)
    return records


def job_scripts(remote: Path) -> dict[str, str]:
    """Name -> text of the *.sub files under remote now; dpdispatcher may delete folders meanwhile."""
    found = {}
    try:
        for sub in remote.rglob("*.sub"):
            try:
                found[sub.name] = sub.read_text()
            except OSError:
                pass
    except OSError:  # a folder vanished under the walk: what was read so far is kept
        pass
    return found


def run_watching_scripts(command: list[str], workdir: Path, remote: Path, timeout: float = 300,
                         on_poll=None) -> tuple[int, str, dict[str, str]]:
    """Run `command` in workdir; keep every dpdispatcher job script (*.sub) seen under remote,
    since dpdispatcher removes the remote dir after a successful submission."""
    scripts: dict[str, str] = {}
    log = workdir / "loop.stderr"
    with log.open("w") as err:
        proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"the loop took more than {timeout} s"
                scripts.update({k: v for k, v in job_scripts(remote).items() if k not in scripts})
                if on_poll is not None:
                    on_poll()
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text(), scripts


def train_loop(tmp_path: Path, machine: dict, numb_models: int = 2, on_poll=None):
    param_path, machine_path = write_inputs(tmp_path, make_param(tmp_path, numb_models=numb_models), machine)
    code, stderr, scripts = run_watching_scripts(train_only(param_path, machine_path), tmp_path,
                                                 tmp_path / machine_remote_root(machine), on_poll=on_poll)
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "record.spingen").read_text().split("\n")[:3] == ["0 0", "0 1", "0 2"]
    return scripts


def machine_remote_root(machine: dict) -> str:
    train = machine["train"][0] if isinstance(machine["train"], list) else machine["train"]
    return train["machine"]["remote_root"]  # an absolute one stays as is under tmp_path / ...


def check_slurm_scripts(scripts: dict[str, str], n_jobs: int, partition: str) -> None:
    assert len(scripts) == n_jobs, f"expected {n_jobs} job script(s), saw {sorted(scripts)}"
    for text in scripts.values():
        assert text.startswith("#!/bin/bash -l\n#SBATCH --nodes 1\n#SBATCH --ntasks-per-node 1\n")
        assert f"#SBATCH --partition {partition}" in text and "--gres" not in text
        assert f"source {BIN / 'activate'}" in text  # the examples' source_list, pointed at this venv


# ---------------------------------------------------------------- a. train, Slurm + LocalContext
def test_train_stage_as_slurm_jobs_local_context(tmp_path, cluster):
    machine = for_this_host("slurm.json", cluster, "remote")  # relative: under the work dir
    scripts = train_loop(tmp_path, machine)
    check_models(tmp_path, spin=True)
    check_slurm_scripts(scripts, 2, cluster["SPINGEN_CLUSTER_PARTITION"])
    assert all("#SBATCH --time=24:00:00\n#SBATCH --mem=1G" in text for text in scripts.values())
    jobs = slurm_jobs(cluster, tmp_path / "remote")
    assert len(jobs) == 2 and all(j["JobState"] == "COMPLETED" and j["Partition"] == "debug" for j in jobs), jobs
    assert all(j["NodeList"] == "localhost" and j["ExitCode"] == "0:0" for j in jobs)


# ---------------------------------------------------------------- b. train, Slurm + SSHContext
def test_train_stage_as_slurm_jobs_over_ssh(tmp_path, cluster):
    remote = tmp_path / "ssh_remote"  # the "cluster" is this host: its remote dir is a local one
    machine = for_this_host("ssh_slurm.json", cluster, str(remote))
    sshd_log = STATE / "ssh" / "sshd.log"
    logins_before = sshd_log.read_text().count("Accepted publickey for")
    scripts = train_loop(tmp_path, machine)
    assert sshd_log.read_text().count("Accepted publickey for") > logins_before, "dpdispatcher logged in by SSH"
    train = tmp_path / "iter.000000" / "00.train"
    report = json.loads((train / "models.json").read_text())
    assert [r["model"] for r in report] == ["000/frozen_model.pth", "001/frozen_model.pth"]
    assert all((train / t / "frozen_model.pth").stat().st_size > 0 for t in ("000", "001"))
    check_slurm_scripts(scripts, 2, cluster["SPINGEN_CLUSTER_PARTITION"])
    jobs = slurm_jobs(cluster, remote)
    assert len(jobs) == 2 and all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    assert not (tmp_path / "remote").exists(), "nothing ran through a local remote dir"


# ---------------------------------------------------------------- c. label (GPAW) as a Slurm job
def test_gpaw_label_as_a_slurm_job(tmp_path, cluster):
    pytest.importorskip("gpaw", reason="GPAW is not installed: run scripts/install_gpaw.sh")
    from ase.build import bulk

    from spingen.data.npy import load_system
    from spingen.loop import StageContext
    from spingen.schema import load_machine, load_param
    from spingen.stages.label import LabelStage

    param = make_param(tmp_path, spin={"magnetic": ["Ni"], "moments": {"Ni": [0, 1.8]}}, fp_spin_init="states",
                       fp_gpaw={"ecut": 300.0, "kpts": [2, 2, 2]})
    machine = for_this_host("slurm.json", cluster, "remote", fp=str(BIN / "spingen"))
    param_path, machine_path = write_inputs(tmp_path, param, machine)
    stage = LabelStage(load_param(param_path), load_machine(machine_path).fp)
    nio = bulk("NiO", "rocksalt", a=4.17)
    nio.arrays["initial_magmoms"] = np.array([1.8, 0.0])
    nio.info.update(task="task.000.000000", step=0, max_devi_f=0.2)
    candidates = tmp_path / "iter.000000" / "01.model_devi" / "candidates.000.extxyz"
    candidates.parent.mkdir(parents=True)
    ase.io.write(candidates, [nio], format="extxyz")
    ctx = StageContext(tmp_path, 0)
    stage.path(ctx).mkdir(parents=True)
    stage.make(ctx)
    assert stage.task_dirs(ctx) == ["task.000.000000"]
    stage.run(ctx)
    stage.post(ctx)
    system = load_system(stage.path(ctx) / "data.000")
    assert system.get_nframes() == 1 and system.data["spins"][0, 0, 2] == pytest.approx(1.75, abs=0.2)
    (job,) = slurm_jobs(cluster, tmp_path / "remote")
    assert job["JobState"] == "COMPLETED" and job["Partition"] == "debug"


# ---------------------------------------------------------------- d. a scancel-ed job is resubmitted
SLOW_DP = """#!/bin/sh
echo "${{SLURM_JOB_ID:-none}} $(pwd) $*" >> {calls}
case " $* " in *" train "*) sleep 5 ;; esac
exec {dp} "$@"
"""


def test_scancelled_job_is_resubmitted_and_the_stage_finishes(tmp_path, cluster):
    calls = tmp_path / "dp_calls.txt"
    wrapper = tmp_path / "slow_dp"
    wrapper.write_text(SLOW_DP.format(calls=calls, dp=BIN / "dp"))
    wrapper.chmod(0o755)
    machine = for_this_host("slurm.json", cluster, "remote", train=str(wrapper))
    cancelled = []

    def cancel_once():
        if cancelled or not calls.exists():
            return
        job_id = calls.read_text().split()[0]
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        cancelled.append(job_id)

    train_loop(tmp_path, machine, numb_models=1, on_poll=cancel_once)
    assert cancelled, "the job was never seen running"
    trains = [line.split() for line in calls.read_text().splitlines() if " train " in line]
    job_ids = [t[0] for t in trains]
    assert job_ids[0] == cancelled[0] and len(set(job_ids)) == 2, f"one cancelled job, one resubmitted: {trains}"
    assert (tmp_path / "iter.000000" / "00.train" / "000" / "frozen_model.pth").is_file()
    states = {j["JobId"]: j["JobState"] for j in slurm_jobs(cluster, tmp_path / "remote")}
    assert states[cancelled[0]] == "CANCELLED" and states[job_ids[1]] == "COMPLETED", states


# ---------------------------------------------------------------- e. a task that always fails
def test_always_failing_task_stops_the_run_after_retry_count(tmp_path, cluster):
    machine = for_this_host("slurm.json", cluster, "remote", train="false")  # `false --pt train ...` exits 1
    machine["train"][0]["machine"]["retry_count"] = 1  # 2 attempts
    param_path, machine_path = write_inputs(tmp_path, make_param(tmp_path, numb_models=1), machine)
    code, stderr, _ = run_watching_scripts(train_only(param_path, machine_path), tmp_path, tmp_path / "remote")
    assert code != 0 and "failed 2 times" in stderr, stderr[-3000:]
    assert (tmp_path / "record.spingen").read_text() == "0 0\n", "stopped in run_train, resumable there"
    jobs = slurm_jobs(cluster, tmp_path / "remote")
    assert len(jobs) == 2 and all(j["JobState"] == "FAILED" for j in jobs), jobs
    assert "unfinished: " in stderr and "00.train/000" in stderr and "run the same command again" in stderr
