"""GPT-2 in one file, in the manner of nanoGPT.

Pre-LayerNorm transformer blocks, GELU MLP, tied input/output embeddings and GPT-2's
initialisation. Attention uses ``scaled_dot_product_attention(is_causal=True)``, so the model
holds no causal-mask buffer: every tensor in ``state_dict`` is a trained parameter, which is
what snapshots and weight averaging should see (the only buffers, the per-layer query scales of
``scale_attn_by_inverse_layer_idx``, are non-persistent).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Hugging Face names of the released GPT-2 models and their shapes.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

# the values of GPT.attention_backend other than "auto" (PyTorch's own choice)
ATTENTION_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    # divide attention logits of layer i by (i + 1), as the paper's (Sophia's) GPT-2 runs did
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if min(self.block_size, self.vocab_size, self.n_layer, self.n_head) < 1:
            raise ValueError(f"every size in {self} must be positive")

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        # The per-layer factor 1 / (layer_idx + 1) is multiplied into the queries as a tensor, not
        # passed to SDPA as its float ``scale``: torch.compile specialises on a float, so every
        # block would compile to a graph of its own. Non-persistent: it is no trained weight, so
        # state_dict (snapshots, averaging) never sees it; ``to`` and fully_shard move it.
        q_scale = torch.tensor(1.0 / (layer_idx + 1)) if config.scale_attn_by_inverse_layer_idx else None
        self.register_buffer("q_scale", q_scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        if self.q_scale is not None:
            q = q * self.q_scale
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # SDPA's default scale, 1 / sqrt(head_dim), the same in every layer
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits ``h @ w.T`` (rows of ``h`` against ``targets``), made
    ``rows`` rows at a time: the logits of the whole batch never exist at once. Each chunk's
    gradients for ``h`` and ``w`` are made in the forward while its logits are at hand, so the
    backward only scales them and recomputes nothing; ``grad``: whether to make them (not under
    ``torch.no_grad``, which ``ctx.needs_input_grad`` does not tell). The logits are made in the
    compute dtype (bf16 under autocast) and taken to fp32 for the softmax, as the plain path."""

    @staticmethod
    def forward(ctx, h, w, targets, rows, grad):
        n = len(targets)
        loss = torch.zeros((), device=h.device)
        dh = torch.empty_like(h) if grad else None
        dw = torch.zeros_like(w, dtype=torch.float32) if grad else None
        for i in range(0, n, rows):
            hc, tc = h[i : i + rows], targets[i : i + rows]
            logits = F.linear(hc, w)
            logp = torch.log_softmax(logits.float(), dim=-1)
            loss -= logp.gather(1, tc[:, None]).sum()
            if grad:
                g = logp.exp_()  # d(loss)/d(logits) = (softmax - one_hot) / n
                g[torch.arange(len(tc), device=g.device), tc] -= 1
                g = g.div_(n).to(logits.dtype)
                dh[i : i + rows] = g @ w
                dw += g.t() @ hc
        if grad:
            ctx.save_for_backward(dh, dw.to(w.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return dh * grad_loss, dw * grad_loss, None, None, None


class GPT(nn.Module):
    # Set by the trainer, not in GPTConfig (which describes the architecture, in every snapshot):
    # rows of the final hidden states per chunk of the output layer and loss (ChunkedCrossEntropy);
    # 0: the plain path, the whole batch's logits at once
    loss_chunk_rows: int = 0
    # the SDPA kernel: "auto" (PyTorch's choice) or a key of ATTENTION_BACKENDS; a compiled model
    # keeps the kernel it was compiled with, so set it before the first forward
    attention_backend: str = "auto"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final layer-normed hidden state of every position."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        backend = self.attention_backend
        with contextlib.nullcontext() if backend == "auto" else sdpa_kernel(ATTENTION_BACKENDS[backend]):
            for block in self.transformer.h:
                x = block(x)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(None, mean cross-entropy)`` with ``targets`` (no logits are kept), else the
        last position's logits (for generation); ``logits`` gives every position's."""
        x = self.hidden(idx)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        return None, self.loss(x, targets)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The output layer and the mean cross-entropy of the final hidden states ``x``
        (compiled on its own under FSDP2, whose root module runs eagerly)."""
        x, targets = x.view(-1, x.size(-1)), targets.reshape(-1)
        if self.loss_chunk_rows:
            rows, grad = self.loss_chunk_rows, torch.is_grad_enabled()
            return ChunkedCrossEntropy.apply(x, self.lm_head.weight, targets, rows, grad)
        return F.cross_entropy(self.lm_head(x).float(), targets)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position."""
        return self.lm_head(self.hidden(idx))

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the Linear weight matrices only, not on embeddings
        (tied with the output layer), biases and LayerNorm gains, as the paper's runs;
        the fused CUDA kernel when training on a GPU."""
        embeddings = {"transformer.wte.weight", "transformer.wpe.weight"}
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.dim() >= 2 and n not in embeddings]
        no_decay = [p for n, p in named if p.dim() < 2 or n in embeddings]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N for the weights plus attention (PaLM appendix B)."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dropout: float = 0.0) -> GPT:
        """GPT-2 weights from the Hugging Face hub (``gpt2``, ``gpt2-medium``, ...), from a local
        directory written by transformers' ``save_pretrained``, or from a snapshot or averaged
        checkpoint of this project (``.safetensors`` recording its model shape)."""
        from ewa.files import Weights, model_config_of  # the one safe reader for every format

        path = name_or_dir
        if not os.path.exists(path):
            if name_or_dir not in GPT2_SIZES:
                raise FileNotFoundError(f"{name_or_dir!r} is neither a local path nor one of {sorted(GPT2_SIZES)}")
            from huggingface_hub import snapshot_download

            path = snapshot_download(name_or_dir, allow_patterns=["config.json", "*.safetensors*"])
        weights = Weights(path)
        shape = model_config_of(weights)
        if shape is None:
            raise ValueError(f"{path}: records no model shape (not a GPT-2 directory or a snapshot of this project)")
        model = cls(GPTConfig.from_dict({**shape, "dropout": dropout}))
        model.load_weights(dict(weights.items()))
        return model

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a weights dict (parameter names, tied head optional) into the model,
        with an error that names every missing, unexpected or mis-shaped tensor."""
        own = dict(self.named_parameters())
        weights = {k: v for k, v in weights.items() if not (k == "lm_head.weight" and k not in own)}
        missing = sorted(own.keys() - weights.keys())
        unexpected = sorted(weights.keys() - own.keys())
        shapes = [
            f"{k}: {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(own.keys() & weights.keys())
            if weights[k].shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                "weights do not fit this model "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]})"
            )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(weights[k])

    def config_dict(self) -> dict:
        return asdict(self.config)
