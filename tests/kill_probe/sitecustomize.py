"""Imported at the start of a trainer that a test launches with this folder on PYTHONPATH and
VQGEN_TEST_KILL_IN_SAVE=<step>: the process SIGKILLs itself in the middle of writing checkpoint_<step> (after its
first file), as a preemption without grace or an OOM kill does. With VQGEN_TEST_KILL_RANK=<r>, only rank r dies,
and only after VQGEN_TEST_KILL_DELAY seconds (a slow rank: the others have long finished their own files). Nothing
in vqgen knows about it."""

import os

STEP = os.environ.get("VQGEN_TEST_KILL_IN_SAVE")
RANK = os.environ.get("VQGEN_TEST_KILL_RANK")

if STEP and (RANK is None or RANK == os.environ.get("RANK", "0")):
    import signal
    import time
    from pathlib import Path

    import accelerate.accelerator as _acc

    _real_save = _acc.save_accelerator_state

    def _save_then_die(output_dir, *args, **kwargs):
        if Path(output_dir).name == f"checkpoint_{STEP}":
            time.sleep(float(os.environ.get("VQGEN_TEST_KILL_DELAY", "0")))
            Path(output_dir, f"partial_{os.environ.get('RANK', '0')}").write_bytes(b"the first bytes of a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return _real_save(output_dir, *args, **kwargs)

    _acc.save_accelerator_state = _save_then_die
