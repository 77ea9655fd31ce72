"""Shared fixtures: a small real-text data set and tiny configs, all under tmp paths."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ewa.engine.config import TrainConfig  # noqa: E402
from ewa.files import list_checkpoints, read_resume, snapshot_name  # noqa: E402
from ewa.tools.prepare import prepare_texts  # noqa: E402

SHAKESPEARE = runpy.run_path(str(ROOT / "data" / "shakespeare" / "prepare.py"))


@pytest.fixture(scope="session")
def corpus() -> dict[str, str]:
    """About 150 KB of real text: the first plays of the embedded corpus."""
    plays = SHAKESPEARE["read_plays"]()[:2]
    return SHAKESPEARE["split_plays"](plays)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_texts(out, corpus, "bytes", source="test")
    return out


def tiny_config(out_dir: Path, data_dir: Path, **overrides) -> TrainConfig:
    """A 2-layer, 32-wide model on 32-byte blocks: a step takes milliseconds on a CPU."""
    values = dict(
        out_dir=str(out_dir),
        data_dir=str(data_dir),
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        max_steps=40,
        tokens_per_step=512,
        micro_batch_size=8,
        learning_rate=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        ema_decay=0.9,
        lawa_k=3,
        lawa_nu=10,
        lawa_interval=10,
        swa_lr=1e-3,
        swa_anneal_steps=5,
        swa_every=2,
        eval_interval=10,
        eval_tokens=2048,
        eval_batch_size=16,
        ckpt_interval=5,
        resume_interval=10,
        keep_resume=0,
        log_interval=5,
        device="cpu",
        dtype="float32",
        compile=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def signalled_at(step: int) -> type:
    """A Trainer that receives a preemption signal (SIGTERM) during step ``step``."""
    from ewa.engine.trainer import Trainer

    class Signalled(Trainer):
        def train_step(self):
            loss = super().train_step()
            if self.step == step:
                self.signal.received = signal.SIGTERM
            return loss

    return Signalled


def random_checkpoints(folder: Path, steps, numel: int = 300, seed: int = 0) -> dict[int, Path]:
    """Safetensors files named by step holding random tensors (no model shape recorded)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s in steps:
        paths[s] = folder / snapshot_name(s)
        save_file({"a": torch.randn(numel, generator=g), "b.weight": torch.randn(7, 3, generator=g) * 100}, str(paths[s]))
    return paths


def write_config_file(path: Path, cfg: TrainConfig) -> Path:
    """The config as a plain-Python config file, for the entry scripts."""
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.to_dict().items()))
    return path


def resume_state(run_dir: Path, step: int | None = None) -> dict:
    """A run's resume checkpoint at ``step`` (default: the newest), read whole (``read_resume``)."""
    saved = list_checkpoints(Path(run_dir) / "resume")
    return read_resume(saved[max(saved) if step is None else step])


STEPS = (1000, 2000, 3000, 4000, 5000, 6000)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    """A byte-level BPE of 320 tokens trained on the corpus (transformers' PreTrainedTokenizerFast)."""
    from hf_models import train_tokenizer

    return train_tokenizer(corpus["train"][:20000])


@pytest.fixture(scope="session")
def revisions(tmp_path_factory, tokenizer) -> Path:
    """step1000/ ... step6000/: tiny GPT-NeoX revisions with different random weights; 1000 as
    pytorch_model.bin, 2000 sharded, the others one safetensors file."""
    from hf_models import save_revision, tiny_neox

    root = tmp_path_factory.mktemp("tiny-neox")
    layouts = {1000: "bin", 2000: "sharded"}
    for step in STEPS:
        save_revision(root / f"step{step}", tiny_neox(len(tokenizer), seed=step), tokenizer, layouts.get(step, "safetensors"))
    return root
