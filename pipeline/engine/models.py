"""Model builders (pure PyTorch).

- `digits_cnn`: a small CNN with BatchNorm for 8x8 images given as 64 features.
- `mlp`: a BatchNorm-free MLP for any fixed-size feature vector (used by equivalence tests:
  without BatchNorm the update of a batch does not depend on how it is split).
- `seq_transformer`: a small Transformer encoder over padded token ids with an attention mask;
  a sequence head (masked mean pool) or a per-token head.
- `import:package.module:function`: a user model, called with the same keyword arguments.

Every builder takes `input_dim`, `num_outputs`, `vocab_size`, `per_token` and
`activation_checkpointing` plus its own kwargs, and returns an `nn.Module` whose forward takes
the collated batch dict and returns logits (or embeddings for contrastive training).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.engine.batchnorm import running_stats_frozen

if TYPE_CHECKING:
    from pipeline.config import Config


def checkpointed(module: nn.Module, *args: Any) -> torch.Tensor:
    """`module(*args)` with its activations recomputed in backward instead of stored: same
    gradients, less activation memory.

    The recompute in backward runs the block's forward a second time in training mode; a
    BatchNorm inside would update its running statistics twice per step (`num_batches_tracked`
    2 instead of 1, and other running means at evaluation). The recompute therefore runs with
    the running statistics frozen: it normalises with the same batch statistics, and the
    buffers end exactly as without checkpointing. Dropout masks are replayed (PyTorch restores
    the RNG state for the recompute).
    """
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), running_stats_frozen(module)))


def _maybe_checkpoint(module: nn.Module, x: torch.Tensor, enabled: bool, *args: Any) -> torch.Tensor:
    # Only while training (no backward at evaluation).
    if enabled and module.training and torch.is_grad_enabled():
        return checkpointed(module, x, *args)
    return module(x, *args)


class DigitsCNN(nn.Module):
    def __init__(self, num_outputs: int = 10, width: int = 32, activation_checkpointing: bool = False):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.blocks = nn.ModuleList([
            block(1, width), nn.Sequential(block(width, 2 * width), nn.MaxPool2d(2)),
            block(2 * width, 2 * width),
        ])
        self.head = nn.Linear(2 * width, num_outputs)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["features"].reshape(-1, 1, 8, 8)
        for blk in self.blocks:
            x = _maybe_checkpoint(blk, x, self.activation_checkpointing)
        return self.head(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, input_dim: int, num_outputs: int, hidden: int = 128, depth: int = 2,
                 activation_checkpointing: bool = False):
        super().__init__()
        dims = [input_dim] + [hidden] * depth
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.head = nn.Linear(dims[-1], num_outputs)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["features"]
        for layer in self.layers:
            x = _maybe_checkpoint(layer, x, self.activation_checkpointing)
        return self.head(x)


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Vaswani et al. 2017, sec. 3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]  # an odd dim has one cosine fewer
    return pe


ATTENTION = ("dense", "flex")


class SeqTransformer(nn.Module):
    """`attention` for packed batches: `dense` (a [W, W] boolean mask per row: every score is
    computed, the blocked ones discarded) or `flex` (FlexAttention with a block mask built from
    the segment ids: blocks of 128 x 128 slots that no sample spans are skipped; the same
    parameters and outputs; torch>=2.5, forward only on a CPU -- PyTorch has no FlexAttention
    backward there). Padded batches always take the dense path (a key-padding mask)."""

    def __init__(self, vocab_size: int, num_outputs: int, per_token: bool = False, d_model: int = 64,
                 nhead: int = 4, num_layers: int = 2, dim_feedforward: int = 128, dropout: float = 0.0,
                 activation_checkpointing: bool = False, attention: str = "dense"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}; known: {', '.join(ATTENTION)}")
        if attention == "flex" and dropout:
            raise ValueError("attention=flex takes no attention dropout (dropout must be 0)")
        self.attention = attention
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)
        self.per_token = per_token
        self.activation_checkpointing = activation_checkpointing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Padded batches: [B, L] with `attention_mask`. Packed batches (`segment_ids`,
        `position_ids`: several samples per row, pipeline/data/padding.py) attend only within
        a sample, so each sample's outputs are those it would have padded; per-sample outputs
        come in segment order (row by row)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.shape[0] == 0:  # a rank's empty share of a small validation split: no rows,
            # which the attention's reshapes cannot take (a packed batch is [0, 0] wide)
            hidden = self.head.in_features
            return self.head(self.embed.weight.new_zeros(
                (0, ids.shape[1], hidden) if self.per_token else (0, hidden)))
        pe = sinusoidal_positions(ids.shape[1], self.embed.embedding_dim, ids.device)
        segments = batch.get("segment_ids")
        if segments is None:
            x = self.embed(ids) + pe
            masks: tuple[Any, Any] = (None, ~mask)  # (attention mask, key padding mask)
        else:
            x = self.embed(ids) + pe[batch["position_ids"]]
            if self.attention == "flex":
                return self._head(self._flex_layers(x, segments), mask, segments)
            masks = (self._block_mask(segments), None)
        for layer in self.layers:
            if self._recompute():
                x = checkpointed(layer, x, *masks)
            else:
                x = layer(x, src_mask=masks[0], src_key_padding_mask=masks[1])
        return self._head(x, mask, segments)

    def _recompute(self) -> bool:
        """Whether this forward checkpoints its layers (training with gradients, when asked)."""
        return self.activation_checkpointing and self.training and torch.is_grad_enabled()

    def _head(self, x: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None
              ) -> torch.Tensor:
        x = self.norm(x)
        if self.per_token:
            return self.head(x)
        if segments is not None:
            return self.head(_segment_means(x, segments))
        m = mask.unsqueeze(-1).float()  # (pooled in fp32: a bf16 sum of the mask stops at 256)
        pooled = (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled.to(x.dtype))

    def _flex_layers(self, x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """The encoder layers with FlexAttention over the packed rows: a token attends to the
        tokens of its own sample (and a padding slot to itself only, as `_block_mask`)."""
        from torch.nn.attention.flex_attention import create_block_mask

        def allowed(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return ((segments[b, q] == segments[b, kv]) & (segments[b, q] > 0)) | (q == kv)

        rows, width = segments.shape
        block = create_block_mask(allowed, rows, None, width, width, device=segments.device,
                                  _compile=segments.is_cuda)
        for layer in self.layers:
            if self._recompute():
                x = checkpoint(_flex_layer, layer, x, block, use_reentrant=False)
            else:
                x = _flex_layer(layer, x, block)
        return x

    def _block_mask(self, segments: torch.Tensor) -> torch.Tensor:
        """[R * heads, W, W], True where attention is blocked: between different samples, and
        from a padding slot to anything but itself (a row of all-blocked would give NaN)."""
        same = segments[:, :, None] == segments[:, None, :]
        own = torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)
        allowed = (same & (segments[:, :, None] > 0)) | own
        return (~allowed).repeat_interleave(self.layers[0].self_attn.num_heads, dim=0)


@functools.cache
def _flex_attention(compiled: bool) -> Any:
    """FlexAttention, compiled on a GPU (its fused kernel; eager runs an unfused reference that
    materialises every score, which is all a CPU gets for the forward)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def _flex_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, block: Any) -> torch.Tensor:
    """`layer(x)` (pre-norm, as `SeqTransformer` builds it, no dropout) with its self-attention
    computed by FlexAttention under `block`, from the layer's own weights."""
    attn = layer.self_attn
    rows, width, dim = x.shape
    heads = attn.num_heads
    qkv = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(rows, width, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    out = _flex_attention(x.is_cuda)(q, k, v, block_mask=block)
    out = out.transpose(1, 2).reshape(rows, width, dim)
    x = x + attn.out_proj(out)
    return x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))


def _segment_means(x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Mean of each packed sample's token outputs: [samples, d] in segment order, summed in
    fp32 (CPU autocast leaves LayerNorm's output bf16, where a running count stops at 256
    (256 + 1 rounds to 256): a long sample's mean came out several times too large)."""
    real = segments > 0
    per_row = segments.amax(dim=1)
    first = torch.cumsum(per_row, 0) - per_row  # index of each row's first sample
    index = (first[:, None] + segments - 1)[real]
    sums = torch.zeros(int(per_row.sum()), x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, index, x[real].float())
    counts = torch.bincount(index, minlength=len(sums)).float()
    return (sums / counts[:, None]).to(x.dtype)


def model_spec(cfg: Config, facts: dict[str, int | None]) -> dict[str, Any]:
    """Everything needed to rebuild the model (kept in checkpoints for the final artifact).
    `facts`: what the model needs to know of the data, as the driver's checks found it
    (`DatasetInfo.facts`: feature width, largest token id, target and label)."""
    per_token = cfg.train.loss == "token_cross_entropy"
    if cfg.train.loss == "nt_xent":
        outputs = int(cfg.model.kwargs.get("embedding_dim", 32))
    elif per_token:
        outputs = int(facts["max_target"]) + 1
    else:
        outputs = int(facts["max_label"]) + 1
    kwargs = {k: v for k, v in cfg.model.kwargs.items() if k != "embedding_dim"}
    return {
        "name": cfg.model.name,
        "input_dim": facts["input_dim"],
        "num_outputs": outputs,
        "vocab_size": None if facts["max_token"] is None else int(facts["max_token"]) + 1,
        "per_token": per_token,
        "activation_checkpointing": cfg.model.activation_checkpointing,
        **kwargs,
    }


def build_model(name: str, *, input_dim: int | None, num_outputs: int, vocab_size: int | None,
                per_token: bool = False, activation_checkpointing: bool = False,
                **kwargs: Any) -> nn.Module:
    if name == "digits_cnn":
        if input_dim != 64:
            raise ValueError(f"digits_cnn needs 64 features (8x8 images), got {input_dim}")
        return DigitsCNN(num_outputs, activation_checkpointing=activation_checkpointing, **kwargs)
    if name == "mlp":
        return MLP(int(input_dim or 0), num_outputs, activation_checkpointing=activation_checkpointing,
                   **kwargs)
    if name == "seq_transformer":
        if vocab_size is None:
            raise ValueError("seq_transformer needs a sequence column (data.sequence_column)")
        return SeqTransformer(vocab_size, num_outputs, per_token=per_token,
                              activation_checkpointing=activation_checkpointing, **kwargs)
    if name.startswith("import:"):
        fn = import_builder(name)
        return fn(input_dim=input_dim, num_outputs=num_outputs, vocab_size=vocab_size,
                  per_token=per_token, activation_checkpointing=activation_checkpointing, **kwargs)
    raise ValueError(f"unknown model {name!r}; known: digits_cnn, mlp, seq_transformer, "
                     "import:package.module:function")


def import_builder(name: str) -> Any:
    """The function an `import:package.module:function` model name names, imported (the
    module's import runs the user's code); ImportError, AttributeError or TypeError (not
    callable) otherwise."""
    module_name, _, fn_name = name.removeprefix("import:").partition(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    if not callable(fn):
        raise TypeError(f"{module_name}.{fn_name} is a {type(fn).__name__}, not a function")
    return fn


class FeatureInputs(nn.Module):
    """`model(features)` for a model whose batch dict is {"features"}: positional tensors are
    what `torch.export` (and MLflow's `pt2` format, which needs no unpickling) takes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model({"features": features})


class SequenceInputs(nn.Module):
    """`model(input_ids, attention_mask)` for a model whose batch dict is the padded sequences."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})


def positional_model(model: nn.Module, spec: dict[str, Any]
                     ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model (in eval mode) with positional tensor inputs, and an example batch of 2 for
    tracing it (a batch of 1 would fix the batch dimension): the features, or token ids with an
    attention mask (the second row half padding). Sequence models take `vocab_size`."""
    model.eval()
    if spec.get("vocab_size") is not None:
        ids = torch.zeros(2, 8, dtype=torch.int64)
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[1, 4:] = False
        return SequenceInputs(model).eval(), {"input_ids": ids, "attention_mask": mask}
    return FeatureInputs(model).eval(), {"features": torch.zeros(2, int(spec["input_dim"]))}
