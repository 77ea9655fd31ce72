"""The Hugging Face bridge: export of our GPT to GPT2LMHeadModel with its tokenizer, Hugging Face
averages and their writer, and perplexity on held-out text; all offline."""

import json
import math
import shutil

import pytest
import torch
from hf_models import direct_nll, reference_average, save_revision, tiny_neox
from transformers import AutoModelForCausalLM, AutoTokenizer

from ewa.files import Weights, save_snapshot
from ewa.tools.hf import (
    copy_into_hf_model,
    export,
    held_out_perplexity,
    read_held_out,
    save_hf_average,
    zero_shot_table,
)
from ewa.tools.merge import tensorwise_mean
from ewa.tools.tokenizer import GPT2Tokenizer
from export_hf import main as export_main
from model import GPT, GPTConfig

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\tIt is the east — and Juliet is the sun. 🙂"


def random_gpt(bias: bool, scale: bool, vocab: int = 256, seed: int = 0) -> GPT:
    """A GPT with weights large enough that attention is far from uniform (so a wrong scale shows)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=3, n_head=2, n_embd=32, bias=bias,
                          scale_attn_by_inverse_layer_idx=scale)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.3)
    return model


def snapshot(model: GPT, path):
    save_snapshot(path, dict(model.named_parameters()), {"model_config": json.dumps(model.config_dict())})
    return path


def nanogpt_checkpoint(model: GPT, path):
    """nanoGPT / Sophia's ckpt.pt: torch.compile's prefix on every key, the optimizer beside the weights."""
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    args = {k: v for k, v in model.config_dict().items() if k != "scale_attn_by_inverse_layer_idx" or v}
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict(),
                "model_args": args, "iter_num": 5, "best_val_loss": torch.tensor(2.0)}, path)
    return path


def logits_gap(out, source, vocab: int) -> float:
    """Largest |logit difference| between the exported GPT2LMHeadModel and GPT.from_pretrained(source)."""
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ours = GPT.from_pretrained(str(source)).eval()
    idx = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.cat([ours(idx[:, : t + 1])[0] for t in range(idx.size(1))], dim=1)  # each prefix's last logits
        got = hf(idx).logits
    assert got.shape == (2, 32, vocab)
    return (got - want[..., :vocab]).abs().max().item()


@pytest.mark.parametrize("fmt", ["snapshot", "nanogpt"])
@pytest.mark.parametrize("bias, scale", [(False, False), (True, False), (False, True)])
def test_export_gives_the_same_logits(tmp_path, fmt, bias, scale):
    model = random_gpt(bias, scale)
    write = snapshot if fmt == "snapshot" else nanogpt_checkpoint
    source = write(model, tmp_path / ("step_00000005.safetensors" if fmt == "snapshot" else "ckpt.pt"))
    out = export(source, tmp_path / "hf", "bytes", {})
    assert logits_gap(out, source, 256) <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["scale_attn_by_inverse_layer_idx"] == scale and config["model_type"] == "gpt2"
    weights = Weights(out / "model.safetensors", hf_names=True)
    assert ("transformer.h.0.attn.c_attn.bias" in weights.keys()) and "lm_head.weight" not in weights.keys()
    if not bias:
        assert not weights.get("transformer.h.0.attn.c_attn.bias").any()
    hf = AutoModelForCausalLM.from_pretrained(out)
    prompt = torch.tensor([list(b"ROMEO:")])
    generated = hf.generate(prompt, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        first = GPT.from_pretrained(str(source))(prompt)[0][0, -1].argmax().item()
    assert generated.shape == (1, 11) and generated[0, 6].item() == first


def test_the_attention_scale_matters_here(tmp_path):
    """The parity above would miss a dropped scale_attn_by_inverse_layer_idx if it changed nothing."""
    source = snapshot(random_gpt(False, True), tmp_path / "step_00000005.safetensors")
    out = export(source, tmp_path / "hf", "bytes", {})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": False}))
    assert logits_gap(out, source, 256) > 1e-2


def test_byte_tokenizer_round_trips_text(tmp_path):
    out = export(snapshot(random_gpt(False, False), tmp_path / "s.safetensors"), tmp_path / "hf", "bytes", {})
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8")) and tok.decode(ids) == TEXT and len(tok) == 256


def test_gpt2_bpe_export_trims_the_vocabulary_and_round_trips_text(tmp_path):
    model = random_gpt(True, False, vocab=50304)
    source = snapshot(model, tmp_path / "s.safetensors")
    out = export(source, tmp_path / "hf", "gpt2", {}, shard_bytes=2_000_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert logits_gap(out, source, 50257) <= 1e-5
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT)["input_ids"]
    assert ids == GPT2Tokenizer().encode(TEXT) and tok.decode(ids) == TEXT
    assert tok.eos_token_id == 50256 and json.loads((out / "config.json").read_text())["vocab_size"] == 50257


def test_export_cli_finds_the_snapshot_and_the_tokenizer_of_a_run(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    (run / "snapshots" / "ema").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data_dir": str(data_dir)}))
    for step in (10, 20):
        snapshot(random_gpt(False, False, seed=step), run / "snapshots" / "ema" / f"step_{step:08d}.safetensors")
    export_main([str(run), str(tmp_path / "hf"), "--kind=ema", "--step=10"])
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    info = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert info == {"source": str(run / "snapshots" / "ema" / "step_00000010.safetensors"), "tokenizer": "bytes"}
    average = run / "lawa" / "step_00000020.safetensors"  # lawa.py --save_dir inside the run: the run's tokenizer
    average.parent.mkdir()
    average.write_bytes((run / "snapshots" / "ema" / "step_00000020.safetensors").read_bytes())
    export_main([str(average), str(tmp_path / "hf20")])
    assert logits_gap(tmp_path / "hf20", average, 256) <= 1e-5
    with pytest.raises(SystemExit, match="hf20: exists; remove it"):
        export_main([str(average), str(tmp_path / "hf20")])
    with pytest.raises(SystemExit, match=r"--step=15: no such snapshot; .*ema has steps 10\.\.20"):
        export_main([str(run), str(tmp_path / "x"), "--kind=ema", "--step=15"])
    shutil.copytree(run / "snapshots" / "ema", run / "snapshots" / "ema_0.99")  # a second EMA (ema_decays)
    export_main([str(run), str(tmp_path / "hf99"), "--kind=ema_0.99"])
    assert logits_gap(tmp_path / "hf99", run / "snapshots" / "ema_0.99" / "step_00000020.safetensors", 256) <= 1e-5
    with pytest.raises(SystemExit, match="snapshots/swa: no snapshots; pick --kind among ema, ema_0.99"):
        export_main([str(run), str(tmp_path / "x"), "--kind=swa"])
    lone = snapshot(random_gpt(False, False), tmp_path / "lone.safetensors")
    with pytest.raises(SystemExit, match="lone.safetensors: no run config .* --data_dir=.* or --tokenizer"):
        export_main([str(lone), str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_cli_reads_the_nearest_run_config_only_and_takes_the_tokenizer_flags(tmp_path, data_dir, monkeypatch):
    (tmp_path / "config.json").write_text("{not json")  # not a run's: above the run, never read for it
    run = tmp_path / "run"
    (run / "lawa").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data_dir": data_dir.name}))  # of the working directory
    average = snapshot(random_gpt(False, False), run / "lawa" / "step_00000005.safetensors")
    monkeypatch.chdir(data_dir.parent)
    export_main([str(average), str(tmp_path / "hf-run")])
    assert logits_gap(tmp_path / "hf-run", average, 256) <= 1e-5

    def tokenizer_of(out) -> tuple[str, int]:
        return json.loads((out / "export.json").read_text())["tokenizer"], len(AutoTokenizer.from_pretrained(out))

    (tmp_path / "loose").mkdir()
    loose = snapshot(random_gpt(False, False), tmp_path / "loose" / "step_00000005.safetensors")
    invalid = r"config.json: not valid JSON \(.*\); fix it, or pass --data_dir or --tokenizer$"
    with pytest.raises(SystemExit, match=invalid):
        export_main([str(loose), str(tmp_path / "x")])
    export_main([str(loose), str(tmp_path / "hf-data"), f"--data_dir={data_dir}"])
    assert tokenizer_of(tmp_path / "hf-data") == ("bytes", 256)
    bpe = snapshot(random_gpt(False, False, vocab=50304), tmp_path / "loose" / "step_00000010.safetensors")
    export_main([str(bpe), str(tmp_path / "hf-gpt2"), "--tokenizer=gpt2"])
    assert tokenizer_of(tmp_path / "hf-gpt2") == ("gpt2", 50257)
    assert not (tmp_path / "x").exists()


# -- Hugging Face averages ------------------------------------------------------------------------


def test_float16_members_average_in_float64_and_shards_load(tmp_path, tokenizer):
    members = []
    for step in (1000, 2000, 3000):
        members.append(tmp_path / f"step{step}")
        save_revision(members[-1], tiny_neox(len(tokenizer), seed=step).half(), tokenizer)
    weights = [Weights(m, hf_names=True) for m in members]
    out = save_hf_average(tmp_path / "avg", tensorwise_mean(weights), members[-1], {}, shard_bytes=20_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    got = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    want = reference_average(members)
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k]) for k in want)


def test_in_memory_average_is_the_saved_one(revisions, tmp_path):
    members = [Weights(revisions / f"step{s}", hf_names=True) for s in (2000, 3000, 4000)]
    saved = save_hf_average(tmp_path / "step4000", tensorwise_mean(members), members[-1].path, {})
    model = AutoModelForCausalLM.from_pretrained(revisions / "step1000")
    copy_into_hf_model(model, tensorwise_mean(members), "LAWA at step 4000")
    want = AutoModelForCausalLM.from_pretrained(saved).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


# -- perplexity on held-out text ------------------------------------------------------------------


def test_perplexity_equals_a_direct_computation(revisions, tokenizer, corpus, tmp_path):
    text = corpus["val"][:3000]
    (tmp_path / "held.txt").write_text(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(revisions / "step3000")
    data = read_held_out(tmp_path / "held.txt", tokenizer, budget=10**6)
    assert data.tokens.tolist() == ids and data.words == len(text.split())
    got = held_out_perplexity(model, data, seq_len=64, batch_size=3)  # batches of 3, 3, 2 full windows and a short one
    want = direct_nll(model, ids, 64)
    assert got["tokens"] == len(ids) - 1 and math.isclose(got["nll"], want, rel_tol=1e-6)
    assert math.isclose(got["token_perplexity"], math.exp(want / (len(ids) - 1)), rel_tol=1e-6)
    assert math.isclose(got["word_perplexity"], math.exp(want / len(text.split())), rel_tol=1e-6)
    cut = read_held_out(tmp_path / "held.txt", tokenizer, budget=100)  # ends inside the text
    assert cut.tokens.tolist() == ids[:101] and cut.words == len(tokenizer.decode(ids[:101]).split())

    docs = [corpus["val"][i : i + 400] for i in (5000, 6000, 7000)]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    first, second = (tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs[:2])
    budget = len(first) + len(second)  # the first two documents and the separator between them
    data = read_held_out(tmp_path / "held.jsonl", tokenizer, budget)
    assert data.tokens.tolist() == first + [tokenizer.eos_token_id] + second
    assert data.words == len(docs[0].split()) + len(docs[1].split())


# -- the zero-shot table ----------------------------------------------------------------------------


def test_zero_shot_table_leaves_out_kinds_without_a_column_and_tasks_without_a_figure():
    def record(kind: str, task: str, metrics: dict) -> dict:
        return {"model": "out/run", "step": 20, "kind": kind, "task": task, "metrics": metrics, "higher_is_better": {}}

    records = [record("raw", "a", {"acc": 0.5}), record("lawa", "a", {"acc": 0.6}),
               record("average", "a", {"acc": 0.9}),  # no column: neither shown nor the best
               record("average", "b", {"acc": 0.7}),  # a row of kinds without a column
               record("raw", "c", {"acc_stderr": 0.1})]  # a task without a figure
    assert zero_shot_table(records, lawa_label="LAWA 1-sqrt").splitlines() == [
        "| Model | Step | Task | LAWA 1-sqrt | Original |", "|---|---:|---|---:|---:|",
        "| run | 20 | a (acc, %) | **60.00** | 50.00 |"]
