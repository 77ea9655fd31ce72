from pathlib import Path

import pytest

from ewa.engine.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    read_config_file,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.py"))
PAPER = {"small": (12, 768, 12, 6e-3), "medium": (24, 1024, 16, 3e-3), "large": (36, 1280, 20, 2e-3)}


def test_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"tiny", "small", "medium", "large"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, [])
    assert isinstance(cfg, TrainConfig)
    cfg.grad_accum_steps(1)


@pytest.mark.parametrize("size", sorted(PAPER))
def test_paper_configs_have_the_paper_settings(size):
    cfg = load_config(ROOT / "configs" / f"{size}.py", [])
    n_layer, n_embd, n_head, lr = PAPER[size]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.learning_rate) == (n_layer, n_embd, n_head, lr)
    assert (cfg.max_steps, cfg.block_size, cfg.tokens_per_step, cfg.warmup_steps) == (70_000, 1024, 131_072, 2000)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.dtype == "bfloat16" and cfg.compile and cfg.ema_decay == 0.9
    assert cfg.init_from == "auto"  # a requeued or restarted job continues with the same command
    # the same global batch on 1, 2, 4 or 8 GPUs: accumulation makes up the difference
    steps = {w: cfg.grad_accum_steps(w) for w in (1, 2, 4, 8)}
    assert all(s * w * cfg.micro_batch_size * cfg.block_size == 131_072 for w, s in steps.items())


def test_impossible_split_is_a_clear_error():
    cfg = load_config(ROOT / "configs" / "small.py", [])
    with pytest.raises(ConfigError, match="cannot be split over 3 processes"):
        cfg.grad_accum_steps(3)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "tiny.py", ["--max_steps=7", "--learning_rate=3e-3", "--compile=True", "--out_dir=x"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.compile, cfg.out_dir) == (7, 3e-3, True, "x")
    assert isinstance(cfg.learning_rate, float)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--max_step=7", "unknown config key 'max_step'; did you mean max_steps"),
        ("--max_steps=seven", "--max_steps=seven: expected an int"),
        ("--compile=maybe", "expected True or False"),
        ("--learning_rate=fast", "expected a number"),
        ("max_steps=7", "overrides are written --key=value"),
    ],
)
def test_bad_overrides_name_the_key(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides([arg])


def test_bad_config_file_names_file_and_key(tmp_path):
    typo = tmp_path / "typo.py"
    typo.write_text("n_layers = 4\n")
    with pytest.raises(ConfigError, match=r"typo.py: unknown config key 'n_layers'; did you mean n_layer"):
        read_config_file(typo)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("max_steps = '100'\n")
    with pytest.raises(ConfigError, match=r"wrong.py: max_steps='100' has type str, expected int"):
        read_config_file(wrong)
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.py")


def test_config_file_may_compute_values(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\n_blocks = 4\nblock_size = 64\ntokens_per_step = _blocks * block_size * 16\n")
    assert read_config_file(f) == {"block_size": 64, "tokens_per_step": 4096}


def test_first_argument_may_name_another_config_file():
    cfg = load_config(ROOT / "configs" / "small.py", [str(ROOT / "configs" / "tiny.py"), "--max_steps=3"])
    assert cfg.n_layer == 4 and cfg.max_steps == 3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_embd": 100, "n_head": 3}, "divisible by n_head"),
        ({"tokens_per_step": 1000}, "multiple of micro_batch_size"),
        ({"max_steps": 0}, "max_steps=0 must be positive"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"swa_start": 1.5}, "swa_start"),
        ({"dtype": "float16"}, "dtype"),
        ({"lawa_online": True, "eval_interval": 50, "lawa_nu": 20}, "multiple of lawa_nu"),
        ({"learning_rate": float("nan")}, "finite"),
        ({"branch_weights": "swa"}, r"branch_weights='swa': use raw, ema, lawa or ema_<decay>"),
        ({"branch_weights": "ema_.99"}, r"branch_weights='ema_.99': .*\(e.g. ema_0.99\)"),
        ({"branch_weights": "ema_1"}, "branch_weights='ema_1'"),
    ],
)
def test_post_init_checks(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{"micro_batch_size": 4, "block_size": 64, "tokens_per_step": 4096, **changes})


def test_ema_decays_add_to_the_papers_ema():
    """The issue's own example: ema_decay=0.9 listed again in ema_decays is the same EMA."""
    cfg = TrainConfig(ema_decay=0.9, ema_decays="0.9,0.99,0.99", branch_weights="ema_0.99")
    assert cfg.emas() == {"ema": 0.9, "ema_0.99": 0.99}
    assert TrainConfig(ema=False, ema_decays="0.9").emas() == {"ema_0.9": 0.9}


def test_derived_values():
    cfg = TrainConfig(max_steps=1000, swa_start=0.75, eval_tokens=10_000, block_size=1000, tokens_per_step=16_000)
    assert cfg.swa_start_step() == 750 and cfg.decay_steps() == 1000 and cfg.eval_windows() == 10


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "medium.py", ["--seed=3"])
    save_config(cfg, tmp_path / "config.json")
    import json

    assert config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
