"""Long runs on shared machines: a signal or the time budget ends a run with a complete checkpoint at a step every
rank agreed on and exit code 75; `--resume_from_checkpoint auto` continues it bit for bit; extraction stops
between shards; the SLURM recipe parses as sbatch reads it and its training command runs."""

import gc
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stage1_vqvae.train import main as train1
from vqgen.cli import VqgenError
from vqgen.preemption import EXIT_PREEMPTED, Stopper, parse_duration
from vqgen.training import list_checkpoints, resolve_resume

from helpers import ROOT, TINY1, TINY2, free_port, make_tar_shards, stage1_args, train2

# The threads of this process (conftest): results of a subprocess and of this process are compared bit for bit.
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()), ACCELERATE_USE_CPU="true")
ENV["PATH"] = os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", "")  # the environment's `accelerate`


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """A run stopped in this process leaves the stop signals ignored (its way out); the next test gets them back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def start(*cmd: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *cmd], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended ({proc.returncode}) before {path} appeared:\n{proc.stderr.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no exit within {timeout} s after the signal (a hang)") from None
    return proc.returncode, err


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def newest_step(out: Path) -> int:
    return list_checkpoints(out / "checkpoints")[-1][0]


# --------------------------------------------------------------------------------------------------
# The pieces


def test_durations_parse_like_slurm_and_bad_ones_are_one_error():
    assert parse_duration(90) == 90 and parse_duration("90") == 90 and parse_duration(None) is None
    assert parse_duration("23:30:00") == 84600 and parse_duration("05:00") == 300
    assert parse_duration("1-02:00:00") == 93600
    for bad in ("soon", "-5", 0):
        with pytest.raises(VqgenError, match="max_time"):
            parse_duration(bad)


def test_the_budget_stops_before_the_step_that_would_pass_it(monkeypatch):
    from accelerate import Accelerator

    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    stopper = Stopper(["SIGUSR1"], max_time=10)  # t0 = 0; then one second a step
    accelerator = Accelerator(cpu=True)
    stops = []
    while not any(stops) and len(stops) < 20:
        stops.append(stopper.should_stop(accelerator))
    # Step k ends at t = k + 1 s. At t = 10 s the next step would end at 11 s, past the budget: stop there.
    assert stops.index(True) == 9 and stopper.elapsed == 10 and stopper.longest_step == 1
    assert "max_time" in stopper.reason and stopper.note()["elapsed_s"] == 10


def test_auto_resumes_the_newest_complete_checkpoint_or_none(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None  # nothing there: a fresh start, no error
    for step in (3, 6):
        (root / f"checkpoint_{step}").mkdir(parents=True)
        (root / f"checkpoint_{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    assert resolve_resume("auto", root).name == "checkpoint_6"
    (root / "checkpoint_6" / "trainer_state.json").unlink()  # a save cut short
    assert resolve_resume("auto", root).name == "checkpoint_3"
    with pytest.raises(VqgenError, match="holds no complete checkpoint"):
        resolve_resume("latest", tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# Trainers sent SIGTERM


def signalled_then_resumed(module: str, args, reference_args, sig=signal.SIGTERM, train=None) -> tuple[Path, int]:
    """Start a trainer subprocess, signal it once its first checkpoint exists, check exit 75 and the checkpoint at
    the step it reached, resume it with `auto` in this process and compare with an uninterrupted run."""
    out = Path(args[args.index("--output_dir") + 1])
    proc = start("-m", module, *args)
    wait_for(out / "checkpoints" / "checkpoint_5" / "trainer_state.json", proc)
    os.kill(proc.pid, sig)
    time.sleep(0.05)  # a second signal, during the step or the save: it changes nothing
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass  # already saved and gone
    code, err = finish(proc)
    assert code == EXIT_PREEMPTED, err[-3000:]
    step = newest_step(out)
    assert step >= 5 and re.search(rf"stopped at step {step} \({signal.Signals(sig).name}\)", err), err[-2000:]
    assert f"checkpoint_{step}" in err and "--resume_from_checkpoint auto" in err
    assert not (out / "model").exists()  # stopped, not finished
    resumed = Path(train([*args, "--resume_from_checkpoint", "auto"]))
    same_weights(Path(train(reference_args)), resumed)
    return resumed, step


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "stream"])
def test_stage1_stopped_by_sigterm_resumes_with_auto_to_the_uninterrupted_weights(tmp_path, image_folder, source):
    data = image_folder if source == "folder" else make_tar_shards(tmp_path / "wds")
    extra = ["train.max_steps=300", "train.checkpoint_every=5", "model.dead_code_window=2"]
    if source == "stream":
        extra += ["data.streaming=true", "data.shuffle_buffer=1", "data.streaming_holdout=4"]

    def args(out):
        return [*stage1_args(out, data, *extra), "--output_dir", str(out)]

    resumed, _ = signalled_then_resumed("stage1_vqvae.train", args(tmp_path / "b"), args(tmp_path / "a"), train=train1)
    assert load_file(str(resumed / "model.safetensors"))["quantizer.code_age"].max() < 300  # restarts fired


@pytest.mark.slow
def test_stage2_stopped_by_sigusr1_resumes_with_auto_to_the_uninterrupted_weights(stage1, tmp_path):
    _, _, codes = stage1
    extra = ["train.max_steps=300", "train.checkpoint_every=5", "model.dropout=0.1"]

    def args(out):
        return ["--config", TINY2, "--output_dir", str(out), f"data.codes={codes}", *extra]

    def train(argv):
        return train2(argv[argv.index("--output_dir") + 1], codes, *argv[4:])

    signalled_then_resumed("stage2_prior.train", args(tmp_path / "b"), args(tmp_path / "a"), signal.SIGUSR1, train)


def torchrun(*args: str) -> subprocess.Popen:
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return start(*cmd, *args)


def worker_pids(launcher: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["one rank", "the launcher"])
def test_two_ranks_stop_at_the_same_step_whoever_is_signalled(tmp_path, image_folder, target):
    out = tmp_path / "run"
    proc = torchrun("-m", "stage1_vqvae.train", *stage1_args(out, image_folder, "train.max_steps=100000",
                                                             "train.checkpoint_every=5"))  # fmt: skip
    wait_for(out / "checkpoints" / "checkpoint_5" / "trainer_state.json", proc)
    if target == "one rank":
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGTERM)  # rank 0 hears nothing: it learns at the next step's all-reduce
    else:
        os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to both workers
    code, err = finish(proc, timeout=120)
    assert code != 0  # torchrun reports its workers' 75 as a failure of the group
    step = newest_step(out)
    assert step >= 5 and f"stopped at step {step}" in err, err[-3000:]
    ckpt = out / "checkpoints" / f"checkpoint_{step}"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}  # both ranks saved it


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate launch", "torchrun"])
def test_a_stop_for_a_requeue_reaches_the_scheduler_through_either_launcher(tmp_path, image_folder, launcher):
    # Audit 3, S4-5: both launchers turn a worker's 75 into their own 1. Wrapped in vqgen.requeue, the job exits
    # 75: a time-budget stop (no signal) through `accelerate launch`, a SIGTERM to the wrapper (a pod's PID 1)
    # through torchrun with 2 processes.
    out = tmp_path / "run"
    args = stage1_args(out, image_folder, "train.max_steps=100000", "train.checkpoint_every=5")
    if launcher == "accelerate launch":
        cmd = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--cpu", "--mixed_precision",
               "no", "--dynamo_backend", "no", "-m", "stage1_vqvae.train", *args, "train.max_time=3"]  # fmt: skip
        bare = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert bare.returncode == 1 and "stopped at step" in bare.stderr  # what a scheduler saw before
        shutil.rmtree(out)
        proc = start("-m", "vqgen.requeue", *cmd)
    else:
        port = str(free_port())
        proc = start("-m", "vqgen.requeue", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", port, "-m", "stage1_vqvae.train", *args)  # fmt: skip
        wait_for(out / "checkpoints" / "checkpoint_5" / "trainer_state.json", proc)
        os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == EXIT_PREEMPTED, err[-3000:]
    step = newest_step(out)
    assert "vqgen.requeue: stopped for a requeue" in err and f"checkpoint_{step}" in err
    state = json.loads((out / "checkpoints" / f"checkpoint_{step}" / "trainer_state.json").read_text())
    assert ("SIGTERM" if launcher == "torchrun" else "train.max_time") in state["stopped_by"]


def test_the_requeue_wrapper_passes_every_other_exit_code_through(tmp_path):
    for code in (0, 1, 2):
        cmd = [sys.executable, "-m", "vqgen.requeue", sys.executable, "-c", f"raise SystemExit({code})"]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
    killed = subprocess.run([sys.executable, "-m", "vqgen.requeue", "bash", "-c", "kill -9 $$"], env=ENV, timeout=60)
    assert killed.returncode == 128 + 9  # as a shell reports a signal
    missing = subprocess.run([sys.executable, "-m", "vqgen.requeue", "no-such-launcher"], env=ENV, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 127 and missing.stderr.count("error:") == 1


def test_the_time_budget_stops_with_a_checkpoint_within_one_step(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train1(stage1_args(out, image_folder, "train.max_steps=100000", "train.checkpoint_every=0",
                           "train.max_time=3"))  # fmt: skip
    assert e.value.code == EXIT_PREEMPTED
    capsys.readouterr()
    del e  # the last reference to the run's frames: an unclosed progress bar would be redrawn now, after the message
    gc.collect()
    assert "stage 1" not in capsys.readouterr().err
    step = newest_step(out)
    state = json.loads((out / "checkpoints" / f"checkpoint_{step}" / "trainer_state.json").read_text())
    assert state["step"] == step > 0 and "max_time" in state["stopped_by"]
    assert state["elapsed_s"] <= 3 <= state["elapsed_s"] + state["longest_step_s"]  # stopped within one step


def test_auto_on_an_empty_folder_starts_and_on_a_checkpoint_resumes(tmp_path, image_folder, caplog):
    args = stage1_args(tmp_path / "run", image_folder, "train.max_steps=4", "train.checkpoint_every=2")
    first = train1([*args, "--resume_from_checkpoint", "auto"])  # an empty folder: from step 0, no error
    assert (first / "model.safetensors").is_file() and newest_step(tmp_path / "run") == 4
    shutil.rmtree(first)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint_4")
    with caplog.at_level("INFO"):
        again = train1([*args, "--resume_from_checkpoint", "auto"])
    assert "resumed from" in caplog.text and "checkpoint_2" in caplog.text
    same_weights(again, train1(stage1_args(tmp_path / "ref", image_folder, "train.max_steps=4",
                                           "train.checkpoint_every=2")))  # fmt: skip


@pytest.mark.slow
def test_a_run_killed_in_the_middle_of_a_save_resumes_under_accelerate_launch(tmp_path, image_folder):
    # Audit 3, S4-2, as users meet it: `accelerate launch`, one checkpoint kept, SIGKILL while checkpoint_4 is being
    # written. The same command with `auto` then resumes from checkpoint_2 (never deletes the run) and ends with
    # the uninterrupted run's weights.
    def launch(out, *extra, env=ENV):
        args = stage1_args(out, image_folder, "train.max_steps=6", "train.checkpoint_every=2",
                           "train.checkpoints_total_limit=1", *extra)  # fmt: skip
        cmd = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stage1_vqvae.train", *args]  # fmt: skip
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    out = tmp_path / "run"
    probe = os.path.join(ROOT, "tests", "kill_probe")
    killer = dict(ENV, VQGEN_TEST_KILL_IN_SAVE="4", PYTHONPATH=os.pathsep.join([probe, str(ROOT)]))
    killed = launch(out, "--resume_from_checkpoint", "auto", env=killer)
    assert killed.returncode != 0 and not (out / "model").exists(), killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_4"]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]  # 4 was cut short; 2 was not pruned first
    resumed = launch(out, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint_2" in resumed.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_6"]  # pruned to the one kept
    reference = launch(tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    same_weights(tmp_path / "ref" / "model", out / "model")


@pytest.mark.slow
def test_a_checkpoint_is_complete_only_once_every_rank_has_written_its_files(tmp_path, image_folder):
    # Audit 3, S4-11: rank 0 wrote the completeness marker as soon as its own files were written; a rank killed
    # while still writing its RNG state left a "complete" checkpoint that failed to load. Here rank 1 is slow and
    # then killed in the save of checkpoint_4: the marker must not be there, and `auto` resumes from checkpoint_2.
    out = tmp_path / "run"
    probe = os.path.join(ROOT, "tests", "kill_probe")
    env = dict(ENV, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([probe, str(ROOT)]), VQGEN_TEST_KILL_IN_SAVE="4",
               VQGEN_TEST_KILL_RANK="1", VQGEN_TEST_KILL_DELAY="3")  # fmt: skip
    args = stage1_args(out, image_folder, "train.max_steps=6", "train.checkpoint_every=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "stage1_vqvae.train", *args]  # fmt: skip
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    ckpt = out / "checkpoints" / "checkpoint_4"
    assert (ckpt / "partial_1").is_file() and (ckpt / "random_states_0.pkl").is_file()  # rank 0 had finished
    assert not (ckpt / "trainer_state.json").exists()  # ... but the checkpoint is not complete
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert resolve_resume("auto", out / "checkpoints") == out / "checkpoints" / "checkpoint_2"


# --------------------------------------------------------------------------------------------------
# Extraction and the SLURM recipe


def test_extraction_stopped_by_sigterm_finishes_its_shard_and_the_rerun_gives_the_same_dataset(
    stage1, tmp_path, monkeypatch
):
    from stage1_vqvae import extract as ex
    from vqgen.codes import load_code_dataset

    _, model_dir, _ = stage1
    args = ["--model", str(model_dir), "--shard_rows", "4", "--num_workers", "0"]
    reference = ex.main([*args, "--output_dir", str(tmp_path / "ref")])
    written, replace = [], os.replace

    def replace_then_signal(src, dst):  # SIGTERM arrives while the second shard's file is being put in place
        replace(src, dst)
        written.append(dst)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ex.os, "replace", replace_then_signal)
    with pytest.raises(SystemExit) as e:
        ex.main([*args, "--output_dir", str(tmp_path / "codes")])
    assert e.value.code == EXIT_PREEMPTED and len(written) == 2  # the shard in progress finished, no other began
    monkeypatch.setattr(ex.os, "replace", replace)
    again = ex.main([*args, "--output_dir", str(tmp_path / "codes")])
    (a, _), (b, _) = load_code_dataset(reference), load_code_dataset(again)
    assert a.keys() == b.keys()
    for split in a:
        assert a[split]["codes"] == b[split]["codes"] and a[split]["label"] == b[split]["label"]


def sbatch_options(script: str) -> dict:
    """#SBATCH lines as sbatch reads them: from the top, up to the first line that is a command."""
    options = {}
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            for token in shlex.split(line[len("#SBATCH") :]):
                key, _, value = token.partition("=")
                options[key] = value
    return options


@pytest.mark.slow  # two `accelerate launch` starts
def test_the_slurm_recipe_parses_and_its_training_command_runs_with_the_tiny_config(tmp_path, image_folder):
    script = (Path(ROOT) / "docs" / "slurm" / "vqgen.sbatch").read_text()
    options = sbatch_options(script)
    assert options["--signal"] == "B:USR1@120" and "--requeue" in options and options["--ntasks-per-node"] == "1"
    assert "--resume_from_checkpoint auto" in script and "scontrol requeue" in script
    per_node = script.split("bash -c '", 1)[1].split("' &", 1)[0]  # the command srun runs on every node
    env = dict(
        ENV,
        MODULE="stage1_vqvae.train",
        CONFIG=TINY1,
        OUT=str(tmp_path / "run"),
        NNODES="1",
        NPROCS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        LAUNCH_ARGS="--cpu",
        SLURM_NODEID="0",
    )
    common = f"data.source={image_folder} data.max_samples=null train.batch_size=8 train.eval_every=0 "
    common += "train.report_to=none train.checkpoint_every=2"
    # The first start ends on its time budget, without a signal: the per-node command exits 75 through the launcher.
    env["EXTRA"] = common + " train.max_steps=100000 train.max_time=3"
    proc = subprocess.run(["bash", "-c", per_node], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    stopped = newest_step(tmp_path / "run")
    env["EXTRA"] = common + f" train.max_steps={stopped + 2}"  # the requeue: the same command line, resumed
    proc = subprocess.run(["bash", "-c", per_node], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file() and newest_step(tmp_path / "run") == stopped + 2
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'checkpoint_{stopped}'}" in proc.stderr


SIGNAL_AT = """
import os, signal, sys
import stage1_vqvae.train as train

where = sys.argv.pop(1)
real = getattr(train, where)

def signalled_then_real(*args, **kwargs):  # a scheduler's SIGTERM, arriving at that moment
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

setattr(train, where, signalled_then_real)
train.cli(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["codebook_rank_diff", "publish"])
def test_a_signal_after_the_last_step_skips_the_optional_figures_and_still_publishes(tmp_path, image_folder, where,
                                                                                       inception_weights):  # fmt: skip
    # Audit 3, S4-10: the signals were caught only inside the loop, so SIGTERM during the final figures (full-split
    # rFID can take minutes) or the publish killed the process (-15) with no final model.
    out = tmp_path / "run"
    args = stage1_args(out, image_folder, "train.max_steps=2", "train.checkpoint_every=2",
                       f"metrics.inception_weights={inception_weights}")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT, where, *args], env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file()
    assert "SIGTERM arrived after the last step: the run finished" in proc.stderr
    validation = json.loads((out / "train_summary.json").read_text())["validation"]
    # Before the figures: the optional rFID is skipped to publish within the grace period; during the publish it
    # was already computed.
    assert ("rfid" in validation) == (where == "publish")


def test_workers_ignore_every_configured_stop_signal(tmp_path):
    # Audit 3, S4-12: workers ignored SIGTERM and SIGUSR1 only; a configured SIGUSR2 sent to the process group
    # killed them mid-batch.
    from vqgen.training import BaseTrainConfig, make_loaders

    class Dispositions(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR2, signal.SIGTERM)])

    tc = BaseTrainConfig(stop_signals=["SIGUSR2"], report_to="none")
    train_dl, val_dl = make_loaders(Dispositions(), Dispositions(), 2, tc, num_workers=1)
    for loader in (train_dl, val_dl):
        assert next(iter(loader)).tolist() == [[True, False]] * 2  # the configured signal, and only it


LEAKED_WORKER = """
import torch
from vqgen.preemption import ignore_stop_signals

class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.zeros(2)

loader = torch.utils.data.DataLoader(Rows(), batch_size=10, num_workers=1, worker_init_fn=ignore_stop_signals)
batches = iter(loader)
next(batches)
batches.cycle = batches  # kept alive past the module's globals, as an error's traceback keeps an iterator
raise SystemExit(3)
"""


def test_a_process_whose_worker_ignores_sigterm_still_exits(tmp_path):
    # multiprocessing's exit handler SIGTERMs daemonic children and joins them: a leaked worker that ignores the
    # stop signals would hold the exit (a failed CLI that never returns) unless vqgen SIGKILLs it first.
    proc = subprocess.run([sys.executable, "-c", LEAKED_WORKER], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "Exception ignored" not in proc.stderr and "killed by signal" not in proc.stderr


def test_only_children_that_ignore_sigterm_count_as_stuck():
    from vqgen.preemption import _ignores_sigterm

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert _ignores_sigterm(os.getpid())
    finally:
        signal.signal(signal.SIGTERM, before)
    assert _ignores_sigterm(os.getpid()) is (before == signal.SIG_IGN)
