import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from ewa.files import (
    CheckpointError,
    Weights,
    atomic_write,
    list_checkpoints,
    load_weights,
    model_config_of,
    save_snapshot,
    strip_wrapper_prefixes,
)
from model import GPT, GPTConfig


def tiny_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))


def test_atomic_write_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"good"))

    def crash(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, crash)
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_snapshot_round_trip_and_metadata(tmp_path):
    model = tiny_gpt()
    weights = dict(model.named_parameters())
    save_snapshot(tmp_path / "step_00000010.safetensors", weights, {"step": "10", "model_config": json.dumps(model.config_dict())})
    w = Weights(tmp_path / "step_00000010.safetensors")
    assert w.metadata["step"] == "10" and model_config_of(w)["n_layer"] == 2
    loaded = load_weights(tmp_path / "step_00000010.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert GPT.from_pretrained(str(tmp_path / "step_00000010.safetensors")).config == model.config


def test_nanogpt_checkpoint_with_wrapper_prefixes_and_mask(tmp_path):
    model = tiny_gpt()
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    sd["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)  # nanoGPT's old mask buffer
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=64, dropout=0.0)
    torch.save({"model": sd, "model_args": model_args, "iter_num": 5, "optimizer": {}}, tmp_path / "ckpt_5.pt")
    w = Weights(tmp_path / "ckpt_5.pt")
    assert model_config_of(w) == model_args
    assert "transformer.h.0.attn.bias" not in w.keys()
    fresh = tiny_gpt(seed=1)
    fresh.load_weights(dict(w.items()))
    assert torch.equal(fresh.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)
    assert strip_wrapper_prefixes("module._orig_mod.lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("shard", [False, True])
def test_hugging_face_gpt2_directory(tmp_path, shard):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    w = Weights(tmp_path)
    assert model_config_of(w)["n_embd"] == 32
    assert w.shapes()["transformer.h.0.attn.c_attn.weight"] == (96, 32)  # transposed from Conv1D
    GPT(GPTConfig.from_dict(model_config_of(w))).load_weights(dict(w.items()))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="refused to load"):
            Weights(p)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_empty_files_are_named(tmp_path):
    save_file({"w": torch.zeros(1000)}, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        Weights(tmp_path / "cut.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: cannot be read"):
        Weights(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Weights(tmp_path / "nope.safetensors")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        Weights(tmp_path / "dir")


def test_list_checkpoints_orders_by_step_and_skips_temporaries(tmp_path):
    for name in ["step_00000200.safetensors", "step_00000010.safetensors", ".step_00000300.safetensors.tmp12", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "step3000").mkdir()
    (tmp_path / "step3000" / "config.json").write_text("{}")
    assert list(list_checkpoints(tmp_path)) == [10, 200, 3000]
    (tmp_path / "ckpt_10.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="both claim step 10"):
        list_checkpoints(tmp_path)


def test_our_safetensors_writer_is_read_by_safetensors_itself(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ewa.files import write_safetensors

    torch.manual_seed(0)
    tensors = {"w": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "e": torch.zeros(0), "x": torch.randn(2, 2).t()}
    write_safetensors(tmp_path / "t.safetensors", tensors, {"step": "3", "kind": "raw"})
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "3", "kind": "raw"}


def test_unsigned_and_float8_tensors_read_back_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from ewa.files import write_safetensors

    torch.manual_seed(0)
    tensors = {f"u{bits}": torch.randint(0, 2**15, (4, 3)).to(getattr(torch, f"uint{bits}")) for bits in (16, 32)}
    tensors["u64"] = torch.tensor([-1, 5]).view(torch.uint64)  # 2**64 - 1: past int64
    tensors |= {str(d): torch.randn(4, 3).to(d) for d in (torch.float8_e4m3fn, torch.float8_e5m2)}

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(
            a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)

    save_file(tensors, tmp_path / "theirs.safetensors")
    assert same(dict(Weights(tmp_path / "theirs.safetensors").items()), tensors)
    write_safetensors(tmp_path / "ours.safetensors", tensors, {})
    assert same(load_file(tmp_path / "ours.safetensors"), tensors)
