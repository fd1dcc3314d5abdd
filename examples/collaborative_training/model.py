"""A small byte-level causal transformer: predicts each next byte of a text from the bytes before it."""

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256  # one token per byte value: no tokenizer to download or train


class CausalTransformer(nn.Module):
    """
    A decoder-only transformer over bytes: embeddings of the byte and its position, ``num_layers`` pre-norm blocks
    of causal self-attention and MLP, and an output layer that shares the embedding matrix.

    :param hidden_size: width of the residual stream
    :param num_layers: transformer blocks
    :param num_heads: attention heads per block (``hidden_size`` must be divisible by it)
    :param max_length: longest sequence the position embeddings cover
    """

    def __init__(self, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, max_length: int = 128):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        self.max_length = max_length
        self.token_embedding = nn.Embedding(VOCAB_SIZE, hidden_size)
        self.position_embedding = nn.Embedding(max_length, hidden_size)
        block = nn.TransformerEncoderLayer(
            hidden_size, num_heads, dim_feedforward=4 * hidden_size, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(hidden_size)
        nn.init.normal_(self.token_embedding.weight, std=1 / math.sqrt(hidden_size))
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [batch, length] -> logits of the next byte at each position, [batch, length, 256]"""
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequences of {length} bytes are longer than max_length={self.max_length}")
        positions = torch.arange(length, device=tokens.device)
        hidden = self.token_embedding(tokens) + self.position_embedding(positions)
        causal_mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.blocks(hidden, mask=causal_mask, is_causal=True)
        return self.final_norm(hidden) @ self.token_embedding.weight.t()

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next byte, in nats (log(256) = 5.55 for a model that knows nothing)."""
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


def make_model(args, seed: int = 0) -> CausalTransformer:
    """The same initial weights on every peer (they are averaged anyway; equal starts make epoch 0 consistent)."""
    torch.manual_seed(seed)
    return CausalTransformer(args.hidden_size, args.num_layers, args.num_heads, max_length=args.seq_length)
