"""The training engine that `distill` and `transfer` share (plain torch, no stage imports another).

- `batching`: padded, aligned batches of (student, teacher) examples and the seeded shard-blocked order;
- `schedules`: learning rate, the distillation share alpha and each term's weight per step;
- `teachers`: the frozen teacher and the teacher signal sources (stored logits, the live model);
- `views`: the student's side of a micro-batch as the losses read it;
- `ranks` and `parallel`: the training processes (torchrun), DDP / FSDP2, layout-free state;
- `engine`: one optimizer step over a step's micro-batches (forward, loss terms, combine, backward,
  gradient accumulation, clip, non-finite guard, optimizer step);
- `checkpoint` and `history`: resumable state and the per-step CSV.
"""
