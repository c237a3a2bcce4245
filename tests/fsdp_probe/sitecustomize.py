"""Imported at the start of every process that a test launches with this folder on PYTHONPATH and
VQGEN_TEST_FSDP_ON_CPU=1: in the training processes (RANK set), it lifts Accelerate's device gate on FSDP.

Accelerate (1.16) turns an FSDP launcher config into `DistributedType.FSDP` only for accelerator device types; on
CPUs the same config comes up as MULTI_CPU (vqgen refuses that in one line: vqgen/sharding.py). The gate is policy,
not a limit: past it, FSDP2's `fully_shard`, its mixed precision, the sharded (torch.distributed.checkpoint) saves
and the full-state export are device-agnostic torch and run on gloo. After AcceleratorState has set itself up as
MULTI_CPU, this does what its accelerator branch does for FSDP (the type, the plugin, the plugin's precision) and
nothing else, so the trainer, `prepare`, the checkpoints and the export are Accelerate's and vqgen's own code. The
tests check that the parameters really are split (the checkpoint's per-rank chunks). Nothing in vqgen knows of it.
It also runs tests/launch_probe's exit checks in every process it is imported into.
"""

import os

if os.environ.get("VQGEN_TEST_FSDP_ON_CPU") == "1" and "RANK" in os.environ:
    from accelerate import state as _state
    from accelerate.utils import DistributedType

    _real_init = _state.AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _real_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

# Only the first sitecustomize on the path is imported: this one also runs tests/launch_probe's exit checks.
import importlib.util as _util  # noqa: E402
import sys  # noqa: E402

_spec = _util.spec_from_file_location(
    "vqgen_launch_probe",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "launch_probe", "sitecustomize.py"),
)
_launch_probe = _util.module_from_spec(_spec)
_spec.loader.exec_module(_launch_probe)
sys.modules[_spec.name] = _launch_probe  # the teardown clears the globals of the modules it knows (its sentinel's)
