"""The token embedding and the LM head, split over the tensor-parallel ranks by
vocabulary rows (even chunks, the last one padded)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orbitllm.layers.matmul import matmul
from orbitllm.layers.tensor_parallel import Shard
from orbitllm.layers.weight_loading import CheckpointTensor, check_shape, take


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows ``[start, start + rows)`` of the table; a token outside
    them contributes zeros, and the all-reduce fills in the owner's row. A tied LM
    head is this table (``compute_logits``)."""

    def __init__(self, vocab_size: int, hidden_size: int, shard: Shard = Shard()) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.shard = vocab_size, hidden_size, shard
        self.rows = -(-vocab_size // shard.size)
        self.start = shard.rank * self.rows
        # Allocated uninitialized: a random init on the meta device imports
        # torch._dynamo (~2 s of start-up).
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside[:, None], 0)
        return self.shard.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``hidden @ table.T``: the logits of ``hidden``'s rows (one row: the decode
        GEMV). Under tensor parallelism every rank must call this for the same rows;
        the full logits land on the driver (None elsewhere)."""
        logits = matmul(hidden, self.weight)
        if self.shard.size == 1:
            return logits
        full = self.shard.gather_last_dim(logits)
        return None if full is None else full[:, :self.vocab_size]

    def load_weight(self, name: str, loaded: CheckpointTensor, shard_id=None) -> None:
        """This rank's rows of the ``[vocab, hidden]`` checkpoint table; the padding
        rows of the last rank's part are zeros."""
        assert name == "weight" and shard_id is None
        check_shape(loaded, (self.vocab_size, self.hidden_size))
        length = max(0, min(self.rows, self.vocab_size - self.start))
        self.weight.data[:length].copy_(take(loaded, {0: (min(self.start, self.vocab_size), length)}))
        self.weight.data[length:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """An LM head with its own weights (untied), split like the embedding."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("an LM head computes logits (compute_logits), it does not embed")
