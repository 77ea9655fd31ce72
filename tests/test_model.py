import contextlib
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model import GPT, GPTConfig


def small(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16), **kw})


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(small())
    idx, targets = torch.randint(0, 64, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits is None  # no logits are kept when the loss is asked for
    assert model.logits(idx).shape == (3, 16, 64)
    assert abs(loss.item() - math.log(64)) < 0.1  # near-uniform predictions at init
    last, none = model(idx)
    assert last.shape == (3, 1, 64) and none is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("scale_by_layer", [False, True])
def test_state_dict_holds_only_parameters_and_head_is_tied(scale_by_layer):
    model = GPT(small(n_layer=3, scale_attn_by_inverse_layer_idx=scale_by_layer))
    # every tensor that snapshots, averaging and load_state_dict see is a trained parameter
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters(remove_duplicate=False)]
    # no causal-mask buffer; the only buffers are the per-layer query scales, kept out of state_dict
    buffers = dict(model.named_buffers())
    assert list(buffers) == ([f"transformer.h.{i}.attn.q_scale" for i in range(3)] if scale_by_layer else [])
    assert not buffers.keys() & model.state_dict().keys()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=8, n_head=4, n_embd=256))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001


def test_optimizer_groups_decay_only_linear_weights():
    model = GPT(small(bias=True))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.transformer.wte.weight for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_attention_scale_by_inverse_layer_changes_deeper_layers_only():
    torch.manual_seed(0)
    a = GPT(small())
    b = GPT(small(scale_attn_by_inverse_layer_idx=True))
    b.load_state_dict(a.state_dict())
    assert a.transformer.h[1].attn.q_scale is None
    assert b.transformer.h[0].attn.q_scale.item() == 1.0 and b.transformer.h[1].attn.q_scale.item() == 0.5
    idx = torch.randint(0, 64, (2, 16))
    assert not torch.allclose(a.logits(idx), b.logits(idx))


@pytest.mark.parametrize("scale_by_layer", [False, True])
def test_from_pretrained_matches_transformers_gpt2(tmp_path, scale_by_layer):
    torch.manual_seed(0)
    hf_config = GPT2Config(
        vocab_size=100, n_positions=32, n_embd=48, n_layer=3, n_head=4,
        scale_attn_by_inverse_layer_idx=scale_by_layer, attn_implementation="eager",
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours.logits(idx)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


PRECISIONS = {  # (model dtype, autocast dtype, tolerance relative to the largest gradient)
    "fp32": (torch.float32, None, 1e-5),
    "autocast-bf16": (torch.float32, torch.bfloat16, 1e-2),  # DDP: fp32 weights, bf16 compute
    "bf16": (torch.bfloat16, None, 1e-2),  # FSDP2's mixed precision: bf16 weights in the forward
}


def loss_and_grads(model, idx, targets, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        _, loss = model(idx, targets)
    # a gradient-accumulation scale reaches the chunked backward; a power of two, so that the two
    # paths round bf16 gradients alike (the head gradient still sums its chunks in another order)
    (loss / 4).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_chunked_loss_matches_plain_path(precision):
    dtype, autocast, tol = PRECISIONS[precision]
    torch.manual_seed(0)
    model = GPT(small(scale_attn_by_inverse_layer_idx=True)).to(dtype)
    idx, targets = torch.randint(0, 64, (2, 3, 16))  # 48 rows: chunks of 20, 20 and 8
    want_loss, want = loss_and_grads(model, idx, targets, autocast)
    model.loss_chunk_rows = 20
    loss, got = loss_and_grads(model, idx, targets, autocast)
    assert loss.dtype == want_loss.dtype == torch.float32
    assert abs(loss.item() - want_loss.item()) < 1e-5
    for name, g in want.items():  # the tied head's gradient adds to the embedding's
        assert got[name].dtype == g.dtype
        assert (got[name] - g).abs().max() <= tol * g.abs().max(), name


def test_chunked_loss_without_grad():
    torch.manual_seed(0)
    model = GPT(small())
    idx, targets = torch.randint(0, 64, (2, 3, 16))
    with torch.no_grad():
        _, want = model(idx, targets)
        model.loss_chunk_rows = 7
        _, got = model(idx, targets)
    assert abs(got.item() - want.item()) < 1e-6 and not got.requires_grad


def test_attention_backend_is_pinned():
    torch.manual_seed(0)
    model = GPT(small(scale_attn_by_inverse_layer_idx=True))
    idx = torch.randint(0, 64, (2, 16))
    want = model.logits(idx)
    for backend in ("math", "flash"):  # both have CPU kernels
        model.attention_backend = backend
        assert torch.allclose(model.logits(idx), want, atol=1e-6)
    model.attention_backend = "cudnn"  # pinned to a kernel the CPU lacks: no silent fallback
    with pytest.raises(RuntimeError, match="No viable backend"):
        model.logits(idx)


def test_load_weights_names_what_does_not_fit():
    model = GPT(small())
    weights = {k: v.clone() for k, v in model.named_parameters()}
    weights["transformer.wpe.weight"] = torch.zeros(8, 16)
    del weights["transformer.ln_f.weight"]
    with pytest.raises(ValueError, match="ln_f.weight.*wpe.weight"):
        model.load_weights(weights)


def test_generate_and_mfu():
    torch.manual_seed(0)
    model = GPT(small())
    out = model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=20, top_k=5)
    assert out.shape == (1, 24)
    assert model.flops_per_token() > 6 * model.get_num_params()
    assert model.estimate_mfu(1e3, 1e12) == pytest.approx(model.flops_per_token() * 1e3 / 1e12)
