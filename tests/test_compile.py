"""torch.compile on the CPU: the blocks share one graph, and the chunked loss compiles."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn import functional as F

from model import GPT, GPTConfig


@pytest.fixture
def dynamo():
    """Fresh dynamo state and counters, restored for the tests that follow."""
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def pre_change_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The logits as the model made them when each layer passed 1 / (sqrt(head_dim) * (i + 1))
    to SDPA as its float ``scale``."""
    B, T = idx.shape
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))
    for i, block in enumerate(model.transformer.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(x.size(-1), dim=2)
        q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.size(-1) ** -0.5 / (i + 1))
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))


def test_blocks_with_per_layer_scale_share_one_graph(dynamo):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=16, vocab_size=64, n_layer=6, n_head=2, n_embd=16, scale_attn_by_inverse_layer_idx=True)
    ).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = model.logits(idx)
        for block in model.transformer.h:  # as the FSDP2 wrapping compiles them
            block.compile(backend="eager", dynamic=False)
        got = model.logits(idx)
        assert dynamo["stats"]["unique_graphs"] == 1
        assert torch.equal(got, want)
        assert torch.allclose(got, pre_change_logits(model, idx), atol=1e-6)


def test_chunked_loss_under_compile(dynamo):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, scale_attn_by_inverse_layer_idx=True)
    )
    idx, targets = torch.randint(0, 64, (2, 3, 16))

    def loss_and_grads(forward):
        model.zero_grad()
        _, loss = forward(idx, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want_loss, want = loss_and_grads(model)
    model.loss_chunk_rows, model.attention_backend = 20, "math"
    # aot_eager traces the autograd.Function's forward and backward as inductor would
    loss, got = loss_and_grads(torch.compile(model, backend="aot_eager", dynamic=False))
    assert dynamo["stats"]["unique_graphs"] == 1 and not dynamo["graph_break"]
    assert abs(loss.item() - want_loss.item()) < 1e-6
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6)
