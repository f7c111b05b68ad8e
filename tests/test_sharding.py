"""FSDP pieces that run on the CPU: a one-process gloo group and torch's ``fully_shard``.

In one process the policy is sharded here with the function accelerate's ``prepare`` calls, and the
reference with ``sdpo.train.sharding``. accelerate itself turns a config into FSDP only on accelerators;
``sdpo.train.sharding.start_cpu_process_group`` makes it do so on CPUs, and tests/test_engines.py trains
under FSDP2 with two CPU processes that way.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.beside  # `make test` runs these in its second pytest process

SCRIPT = r"""
import copy, os, sys, types
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
from accelerate.utils import FullyShardedDataParallelPlugin, fsdp2_prepare_model
from diffusers import WanTransformer3DModel
from sdpo.train.sharding import shard_like_policy

model = WanTransformer3DModel.from_pretrained(sys.argv[1], subfolder="transformer")
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
plugin.set_mixed_precision("bf16")
accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
                                    mixed_precision="bf16", is_main_process=True, torch_device_mesh=None,
                                    parallelism_config=None)
reference = shard_like_policy(accelerator, copy.deepcopy(model).requires_grad_(False).eval())
plugin.set_auto_wrap_policy(model)
policy = fsdp2_prepare_model(accelerator, model.requires_grad_(True).train())
generator = torch.Generator().manual_seed(0)
inputs = dict(hidden_states=torch.randn(2, 4, 2, 4, 4, generator=generator), timestep=torch.tensor([999.0, 500.0]),
              encoder_hidden_states=torch.randn(2, 8, 16, generator=generator), return_dict=False)
with torch.autocast("cpu", dtype=torch.bfloat16):
    ours = policy(**inputs)[0].float()
    with torch.no_grad():
        theirs = reference(**inputs)[0].float()
unsharded = WanTransformer3DModel.from_pretrained(sys.argv[1], subfolder="transformer").eval()
with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
    naive = unsharded(**inputs)[0].float()
print("DIFF", (ours - theirs).abs().max().item(), (ours - naive).abs().max().item())
dist.destroy_process_group()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group checked on linux")
def test_reference_sharded_like_the_policy_computes_the_same_function(tmp_path):
    from sdpo.models import tiny

    model = tiny.build_tiny_wan(tmp_path / "wan")
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(model), "29671"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("DIFF"))
    sharded_diff, naive_diff = (float(x) for x in line.split()[1:])
    assert sharded_diff == 0.0
    assert naive_diff > 0.0  # an unsharded float32 reference does not match the bf16-sharded policy


def test_only_several_fsdp_or_deepspeed_processes_count_as_sharded():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sdpo.train.sharding import parameters_are_sharded, uses_fsdp

    def accelerator(kind, processes):
        return SimpleNamespace(distributed_type=kind, num_processes=processes)

    assert parameters_are_sharded(accelerator(DistributedType.FSDP, 2))
    assert parameters_are_sharded(accelerator(DistributedType.DEEPSPEED, 8))
    assert not parameters_are_sharded(accelerator(DistributedType.FSDP, 1))
    assert not parameters_are_sharded(accelerator(DistributedType.MULTI_GPU, 8))
    assert uses_fsdp(accelerator(DistributedType.FSDP, 1)) and not uses_fsdp(accelerator(DistributedType.NO, 1))


def test_gradient_norms_of_every_backend_become_plain_tensors_or_unknown():
    """FSDP2 returns a DTensor norm, DeepSpeed may return None: the guard must not skip on "unknown"."""
    from types import SimpleNamespace

    import torch

    from sdpo.train.optimize import skip_reason
    from sdpo.train.sharding import clip_gradients

    class Whole:
        def full_tensor(self):
            return torch.tensor(2.5)

    def accelerator(norm):
        return SimpleNamespace(clip_grad_norm_=lambda params, max_norm: norm, num_processes=1)

    assert clip_gradients(accelerator(Whole()), [], 1.0).item() == 2.5
    assert clip_gradients(accelerator(torch.tensor(3.0)), [], 0.0).item() == 3.0
    assert clip_gradients(accelerator(None), [], 1.0) is None
    one = SimpleNamespace(num_processes=1)
    assert skip_reason(one, True, None) is None
    assert skip_reason(one, True, torch.tensor(float("inf"))).startswith("non-finite gradient norm")
    assert skip_reason(one, False, torch.tensor(1.0)) == "non-finite loss"


def test_an_export_copies_views_that_cover_part_of_their_storage(tmp_path):
    """FSDP2 hands back a 1-row weight split over two processes as a view of its padded gather buffer;
    safetensors refuses such a view, so the export copies it (and only it)."""
    import torch
    from safetensors.torch import load_file, save_file

    from sdpo.train.export import owning_storage

    padded = torch.arange(8.0).reshape(2, 4)
    whole = torch.ones(3)
    state = owning_storage({"scale_shift_table": padded[:1], "whole": whole})
    assert state["whole"] is whole and torch.equal(state["scale_shift_table"], padded[:1])
    assert state["scale_shift_table"].untyped_storage().nbytes() == 16
    save_file(state, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["scale_shift_table"], padded[:1])


def test_deepspeed_is_told_the_per_process_batch_and_other_engines_are_left_alone():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sdpo.train.sharding import set_deepspeed_batch_size, start_cpu_process_group

    config = {"train_micro_batch_size_per_gpu": "auto"}
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    set_deepspeed_batch_size(deepspeed, 2)
    assert config["train_micro_batch_size_per_gpu"] == 2
    set_deepspeed_batch_size(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), 2)  # no state touched
    start_cpu_process_group()  # neither DeepSpeed nor FSDP asked for (this process): starts nothing
    from accelerate.state import PartialState

    assert not PartialState._shared_state or PartialState().num_processes == 1
