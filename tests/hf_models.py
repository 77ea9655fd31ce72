"""Tiny Hugging Face models, a tokenizer trained on the spot and lm-eval tasks over local JSON,
shared by the tests of the Hugging Face side (nothing is downloaded), and the plain float64
averages that the merge engine's figures are checked against."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from ewa.files import Weights


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_neox(vocab: int, seed: int, hidden: int = 32) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(config).eval()


def save_revision(folder: Path, model, tokenizer, layout: str = "safetensors") -> None:
    """One revision in one of the layouts the hub holds: one safetensors file, safetensors
    shards, or (older uploads) pytorch_model.bin."""
    model.save_pretrained(folder, max_shard_size="20KB" if layout == "sharded" else "50GB")
    tokenizer.save_pretrained(folder)
    if layout == "bin":
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()


def reference_average(model_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """The plain definition: load every member whole, average in float64."""
    states = [AutoModelForCausalLM.from_pretrained(d).state_dict() for d in model_dirs]
    return {k: torch.stack([s[k].double() for s in states]).mean(0).to(states[-1][k].dtype) for k in states[-1]}


def float64_average(files: list[Path]) -> dict[str, torch.Tensor]:
    """The plain definition for any checkpoint files: load every file, sum in float64, divide."""
    total: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in Weights(f).items():
            total[k] = total.get(k, 0) + v.double()
    return {k: (v / len(files)).float() for k, v in total.items()}


def write_tasks(folder: Path, corpus: dict[str, str]) -> Path:
    """A multiple-choice task and a rolling-perplexity task (like wikitext) over local JSONL."""
    folder.mkdir()
    lines = [line for line in corpus["val"].splitlines() if line.strip()][:32]
    mc = [{"question": lines[i], "choices": lines[i + 1 : i + 4], "answer": i % 3} for i in range(0, 32, 4)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    texts = [corpus["val"][i : i + 300] for i in (0, 300, 600)]
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    (folder / "tiny_text.yaml").write_text(
        f"task: tiny_text\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
    )
    return folder


def direct_nll(model, ids: list[int], seq_len: int) -> float:
    """Window by window through transformers' own loss, one sequence at a time."""
    total = 0.0
    for i in range(0, len(ids) - 1, seq_len):
        window = torch.tensor(ids[i : i + seq_len + 1])[None]
        with torch.no_grad():
            total += model(window, labels=window).loss.double().item() * (window.shape[1] - 1)
    return total
