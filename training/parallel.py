"""
How a model spreads over the processes of a torchrun run, and the memory savers that go with it:

    --shard ddp    every process holds the whole model, optimizer and gradients; DDP all-reduces
                   the gradients (the default)
    --shard fsdp   PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) shards every parameter,
                   its gradient and AdamW's state over the processes. Each transformer block is
                   one unit (the LLM's, IAA's insertion layers, the ViT's, the Q-Former's), the
                   rest of the model is the root unit. A unit's parameters are all-gathered just
                   before it runs and freed after it; its gradients are reduce-scattered.
    --activation-checkpointing   each block keeps only its input; its activations are
                   recomputed in the backward pass (torch.utils.checkpoint, non-reentrant)

Frozen and trainable parameters may share a unit (the root; MWA's blocks, whose adapters sit in
frozen blocks): FSDP2 keeps requires_grad per parameter and reduces only the gradients that exist.
In bf16 the units are gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy), so
the fp32 masters stay sharded. Checkpoints hold full tensors either way: gathered(), one tensor
at a time, and like() to place a full tensor read back as the parameter it belongs to.
"""
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from adapters import MWABlock, WithEnhancer
from model import Block
from qformer import BertLayer, QFormerLayer
from vit import Block as ViTBlock

# The transformer blocks: the units FSDP shards and activation checkpointing recomputes.
BLOCKS = (Block, MWABlock, WithEnhancer, ViTBlock, BertLayer, QFormerLayer)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The outermost transformer blocks inside module, in order, each once (an MWABlock, not
    the frozen Block it wraps)."""
    found = {}

    def visit(m):
        if isinstance(m, BLOCKS):
            found[id(m)] = m
            return
        for child in m.children():
            visit(child)
    visit(module)
    return list(found.values())


def checkpointed(forward):
    """forward, keeping only its inputs for the backward pass, which runs it again."""
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def checkpoint_activations_(model: nn.Module):
    """Activation checkpointing of every transformer block of model (in place)."""
    for block in blocks(model):
        block.forward = checkpointed(block.forward)


def shard_(job, env):
    """FSDP2 over all processes, in place: every block a unit, then the root. The parameters
    become DTensor shards (new objects), so job.param_groups are rebuilt from their names.
    Validation generates, so VLM.generate gathers the root unit as forward does."""
    model = job.model
    names = {id(p): name for name, p in model.named_parameters()}
    mesh = init_device_mesh(env.device.type, (env.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if env.bf16 else MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # MWA's adapters are also reachable through vlm.adapter: their blocks already hold them
    held = {p for p in model.parameters() if isinstance(p, DTensor)}
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=held)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    sharded = dict(model.named_parameters())
    job.param_groups = {group: ([sharded[names[id(p)]] for p in params], lr)
                        for group, (params, lr) in job.param_groups.items()}


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """nn.utils.clip_grad_norm_ for plain or FSDP-sharded gradients: the norm over all of them
    (gathered across processes when sharded), returned as a plain tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def gathered(tensors: dict, rank: int) -> dict:
    """The full tensors, on process 0 ({} elsewhere). Sharded ones are gathered one at a time
    (every process must call this, in the same order) and kept on the CPU, so no device ever
    holds all of them at once."""
    full = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
            t = t.cpu() if rank == 0 else None
        if rank == 0:
            full[name] = t
    return full


def like(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full tensor (read from a checkpoint) placed as target is: this process's shard of it
    when target is FSDP-sharded, else on target's device."""
    tensor = tensor.to(target.device)
    if isinstance(target, DTensor):
        return distribute_tensor(tensor, target.device_mesh, target.placements, src_data_rank=None)
    return tensor


def distribute(job, cfg, env) -> nn.Module:
    """The module the loop calls: job.model with its blocks checkpointed when asked, then, with
    several processes, wrapped in DDP or sharded in place by FSDP2 (see the module docstring)."""
    if cfg.activation_checkpointing:
        checkpoint_activations_(job.model)
    if env.world == 1:
        return job.model
    if cfg.shard == "fsdp":
        shard_(job, env)
        return job.model
    # gradients as views into DDP's buckets: one copy of them, not two
    return nn.parallel.DistributedDataParallel(job.model, gradient_as_bucket_view=True)
