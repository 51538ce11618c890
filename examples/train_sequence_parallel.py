"""Train a small causal language model with every sequence sharded over the ranks of a process
group (sequence parallelism), launched by torchrun:

    torchrun --standalone --nproc-per-node 2 examples/train_sequence_parallel.py     # CPUs, gloo
    torchrun --standalone --nproc-per-node 4 examples/train_sequence_parallel.py --device cuda  # GPUs, NCCL

Rank ``p`` of ``P`` holds positions ``[p * n / P, (p + 1) * n / P)`` of every sequence
(``dilated_ops.shard_sequence``). The attention layers are the factory's "distributed" (here
``DilatedTransformerEncoderLayer(attention_type="distributed")``): each all-to-alls q, k, v to
head shards, attends over the whole sequence, and all-to-alls back. Everything else works per
token, so it runs on the shard as it is; positions are the global ones. The parameters are the
same on every rank, and DistributedDataParallel averages their gradients, so the step is the
one-process step on the whole sequence.

The task: sequences ``start, start + stride, start + 2 * stride, ...`` (mod 16), ``stride`` drawn
per sequence, so the next token needs the stride, which the model reads from earlier tokens.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import dilated_ops
from dilated_ops.long_net import sinusoidal_positions


class ShardedLM(nn.Module):
    def __init__(self, vocab, dim, heads, layers, segment_lengths, dilation_rates):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            dilated_ops.DilatedTransformerEncoderLayer(dim, heads, segment_lengths, dilation_rates, 4 * dim,
                                                       dropout=0.0, attention_type="distributed")
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, seq_len):
        """tokens: this rank's shard ``(batch, seq_len / P)`` of sequences of ``seq_len``."""
        x = self.embed(tokens)
        x = x + dilated_ops.shard_sequence(sinusoidal_positions(seq_len, x.shape[-1], x.device, x.dtype), dim=0)
        for layer in self.layers:
            x = layer(x, is_causal=True)
        return self.head(self.norm(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = ShardedLM(vocab=16, dim=64, heads=4, layers=2, segment_lengths=[64, 256, 512],
                      dilation_rates=[1, 4, 8]).to(device)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)  # the same batches on every rank; each takes its shard
    first = last = None
    for step in range(args.steps):
        start = torch.randint(0, 16, (args.batch, 1), generator=data)
        stride = torch.randint(1, 16, (args.batch, 1), generator=data)
        tokens = ((start + stride * torch.arange(args.seq_len)) % 16).to(device)
        inputs, targets = dilated_ops.shard_sequence(tokens), dilated_ops.shard_sequence(tokens)
        logits = model(inputs, args.seq_len)[:, :-1]
        # next-token loss inside the shard (the shard's last position has its target on the next rank)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 16), targets[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        total = total.item() / world
        first = total if first is None else first
        last = total
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {total:.3f}  ({world} ranks, {args.seq_len // world} positions each)",
                  flush=True)
    if rank == 0:
        print(f"loss {first:.3f} -> {last:.3f}")
    # DistributedDataParallel's last gradient all-reduce works go with the model, here, before
    # the group: with gloo, a work freed by the group's own thread while the group is torn down
    # was seen to deadlock (PyTorch 2.13).
    del model, opt
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
