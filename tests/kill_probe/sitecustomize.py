"""Imported at the start of a trainer that a test launches with this folder on PYTHONPATH and
VQGEN_TEST_KILL_IN_SAVE=<step>: the process SIGKILLs itself in the middle of writing checkpoint_<step> (after its
first file), as a preemption without grace or an OOM kill does. Nothing in vqgen knows about it."""

import os

STEP = os.environ.get("VQGEN_TEST_KILL_IN_SAVE")

if STEP:
    import signal
    from pathlib import Path

    import accelerate.accelerator as _acc

    _real_save = _acc.save_accelerator_state

    def _save_then_die(output_dir, *args, **kwargs):
        if Path(output_dir).name == f"checkpoint_{STEP}":
            Path(output_dir, "model.safetensors").write_bytes(b"the first bytes of a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return _real_save(output_dir, *args, **kwargs)

    _acc.save_accelerator_state = _save_then_die
