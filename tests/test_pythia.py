"""pythia_lawa.py, offline: tiny random GPT-NeoX models saved as step revisions with a tokenizer
trained here (the ``revisions`` fixture), a fake hub cache, and lm-eval tasks over local JSON."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import STEPS
from hf_models import direct_nll, reference_average, save_revision, tiny_neox, write_tasks
from transformers import AutoModelForCausalLM, AutoTokenizer

from ewa.files import CheckpointError
from ewa.tools.hf import read_held_out
from ewa.tools.merge import WindowPlan
from ewa.tools.pythia import gpu_hours_per_step, open_checked, open_revisions, saving
from pythia_lawa import main

WINDOW = ["--k", "3", "--nu", "1000", "--interval", "1000", "--start", "3000"]  # windows at 3000..6000


def layout_without(revisions: Path, tmp_path: Path, *steps: int) -> Path:
    folder = tmp_path / "layout"
    folder.mkdir()
    for step in set(STEPS) - set(steps):
        (folder / f"step{step}").symlink_to(revisions / f"step{step}")
    return folder


def test_averaged_directory_loads_and_equals_the_reference(revisions, tmp_path):
    out = tmp_path / "lawa"
    main(["average", str(revisions), *WINDOW, "--steps", "3000", "5000", "--out_dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["step3000", "step5000"]  # no temporaries left
    for step in (3000, 5000):
        model = AutoModelForCausalLM.from_pretrained(out / f"step{step}")
        members = [revisions / f"step{s}" for s in (step - 2000, step - 1000, step)]
        want = reference_average(members)
        got = model.state_dict()
        assert want.keys() == got.keys()
        assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
        newest = AutoModelForCausalLM.from_pretrained(members[-1]).state_dict()
        assert not torch.equal(got["lm_head.weight"], newest["lm_head.weight"])
        info = json.loads((out / f"step{step}" / "lawa.json").read_text())
        assert info["members"] == [step - 2000, step - 1000, step]
        assert AutoTokenizer.from_pretrained(out / f"step{step}")("To be")["input_ids"]
    written = (out / "step3000" / "model.safetensors").stat().st_mtime_ns
    main(["average", str(revisions), *WINDOW, "--steps", "3000", "--out_dir", str(out)])  # done before: kept
    assert (out / "step3000" / "model.safetensors").stat().st_mtime_ns == written
    with pytest.raises(SystemExit, match="not this window's average"):
        main(["average", str(revisions), "--k", "2", "--nu", "1000", "--interval", "1000", "--start", "3000",
              "--steps", "3000", "--out_dir", str(out)])


def test_missing_revision_is_reported_and_its_windows_skipped(revisions, tmp_path, capsys):
    layout = layout_without(revisions, tmp_path, 4000)
    main(["average", str(layout), *WINDOW, "--out_dir", str(tmp_path / "lawa")])
    err = capsys.readouterr().err
    for step in (4000, 5000, 6000):
        assert f"window at step {step} skipped: no checkpoint at step 4000" in err
    assert [p.name for p in (tmp_path / "lawa").iterdir()] == ["step3000"]


def test_mismatched_or_corrupt_member_is_named(revisions, tmp_path, tokenizer):
    layout = layout_without(revisions, tmp_path, 4000)
    save_revision(layout / "step4000", tiny_neox(len(tokenizer), seed=4000, hidden=48), tokenizer)
    with pytest.raises(CheckpointError, match=r"step4000: does not match .*step1000.*one architecture"):
        open_checked(str(layout), WindowPlan(k=3, nu=1000, interval=1000, start=3000))
    weights = layout / "step4000" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SystemExit, match=f"{weights}"):
        main(["average", str(layout), *WINDOW, "--out_dir", str(tmp_path / "lawa")])


def test_perplexity_command_scores_original_and_lawa_on_the_same_tokens(revisions, corpus, tmp_path):
    (tmp_path / "held.txt").write_text(corpus["val"][:4000])
    out, saved = tmp_path / "ppl.jsonl", tmp_path / "lawa"
    main(["average", str(revisions), *WINDOW, "--steps", "6000", "--out_dir", str(saved)])
    main(["perplexity", str(layout_without(revisions, tmp_path, 4000)), *WINDOW, "--data", str(tmp_path / "held.txt"),
          "--tokens", "300", "--batch_size", "2", "--device", "cpu", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    skipped = {("skipped", s) for s in (4000, 5000, 6000)}
    assert {(r["kind"], r["step"]) for r in records} == {("original", 3000), ("lawa", 3000)} | skipped

    main(["perplexity", str(revisions), *WINDOW, "--steps", "6000", "--data", str(tmp_path / "held.txt"),
          "--tokens", "300", "--batch_size", "2", "--device", "cpu", "--out", str(out)])
    records = {r["kind"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["original"]["tokens"] == records["lawa"]["tokens"] == 300
    assert records["original"]["tokens_sha256"] == records["lawa"]["tokens_sha256"]
    tokenizer = AutoTokenizer.from_pretrained(revisions / "step6000")
    data = read_held_out(tmp_path / "held.txt", tokenizer, 300)
    for kind, folder in (("original", revisions / "step6000"), ("lawa", saved / "step6000")):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert math.isclose(records[kind]["nll"], direct_nll(model, data.tokens.tolist(), 64), rel_tol=1e-6)


def test_zero_shot_with_lm_eval_gives_the_table(revisions, corpus, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = write_tasks(tmp_path / "tasks", corpus)
    out, saved = tmp_path / "zs.jsonl", tmp_path / "lawa"
    main(["zeroshot", str(revisions), *WINDOW, "--steps", "5000", "--tasks", "tiny_mc", "tiny_text",
          "--include_path", str(tasks), "--batch_size", "4", "--device", "cpu", "--save_dir", str(saved),
          "--out", str(out)])
    records = {(r["task"], r["kind"]): r["metrics"] for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {(t, k) for t in ("tiny_mc", "tiny_text") for k in ("original", "lawa")}
    assert all(0 <= records["tiny_mc", k]["acc"] <= 1 for k in ("original", "lawa"))
    ppl = {k: records["tiny_text", k]["word_perplexity"] for k in ("original", "lawa")}
    assert ppl["original"] != ppl["lawa"]
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| Model | Step | Task | LAWA | Original |"
    assert [row.split(" | ")[:3] for row in table[2:]] == [
        [f"| {revisions.name}", "5K", "tiny_mc (acc, %)"],
        [f"| {revisions.name}", "5K", "tiny_text (word_perplexity, lower is better)"],
    ]
    assert f"{ppl['lawa']:.2f}" in table[3] and f"{ppl['original']:.2f}" in table[3]

    # the in-memory models are the ones on disk: lm-eval on the saved average and on step5000 agrees
    task_manager = TaskManager(include_path=str(tasks), include_defaults=False)  # indexes only ours: fast
    for kind, folder in (("lawa", saved / "step5000"), ("original", revisions / "step5000")):
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
        results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_text"], num_fewshot=0, log_samples=False,
                                          task_manager=task_manager, bootstrap_iters=0)
        assert math.isclose(results["results"]["tiny_text"]["word_perplexity,none"], ppl[kind], rel_tol=1e-9)


def test_unknown_task_is_refused_before_any_work(revisions, tmp_path):
    with pytest.raises(SystemExit, match="--tasks no_such_task: unknown to lm-eval"):
        main(["zeroshot", str(revisions), *WINDOW, "--tasks", "no_such_task", "--include_path", str(tmp_path)])


def fake_hub_cache(cache: Path, repo: str, revisions: Path, steps: list[int]) -> None:
    """What snapshot_download leaves: refs/step<N> naming a commit, snapshots/<commit>/ with the files."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    for step in steps:
        commit = f"{step:040x}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / f"step{step}").write_text(commit)
        shutil.copytree(revisions / f"step{step}", folder / "snapshots" / commit)


def test_hub_revisions_come_from_the_offline_cache(revisions, tmp_path, capsys):
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-neox", revisions, [1000, 2000, 4000])
    plan = WindowPlan(k=2, nu=1000, interval=1000, start=2000, end=4000)
    source = open_revisions("tiny-org/tiny-neox", plan, cache_dir=str(tmp_path / "hub"))
    assert sorted(source.paths) == [1000, 2000, 4000] and [w.step for w in source.complete_windows] == [2000]
    assert "not in the local Hugging Face cache" in source.unavailable[3000]
    main(["download", "tiny-org/tiny-neox", "--k", "2", "--nu", "1000", "--interval", "1000", "--start", "2000",
          "--end", "4000", "--cache_dir", str(tmp_path / "hub")])
    captured = capsys.readouterr()
    assert "window at step 4000 skipped: no checkpoint at step 3000 (not in the local" in captured.err
    assert "1 of 3 windows complete" in captured.out
    with pytest.raises(SystemExit, match="none of the 2 revisions"):
        main(["download", "tiny-org/other", "--steps", "141000", "--k", "2", "--cache_dir", str(tmp_path / "hub")])


def test_steps_off_the_window_grid_are_refused(revisions):
    with pytest.raises(SystemExit, match="--steps 3500: no such window.*at 3000, 4000, 5000, ..., 6000"):
        main(["average", str(revisions), *WINDOW, "--steps", "3500", "--out_dir", "unused"])


def test_savings_on_hand_made_trajectories(tmp_path, capsys):
    original = {21000: 30.0, 60000: 24.0, 99000: 21.0, 141000: 20.0}
    lawa = {21000: 27.0, 60000: 21.5, 99000: 19.9, 141000: 19.5}
    hours = 4830 / 143000
    exact = saving(original, lawa, 0.0, hours)
    assert (exact.target, exact.original_step, exact.lawa_step, exact.steps_saved) == (20.0, 141000, 99000, 42000)
    assert math.isclose(exact.gpu_hours_saved, 42000 * hours)
    loose = saving(original, lawa, 1.5, hours)  # target 21.5: the original at 99000, LAWA at 60000
    assert (loose.original_step, loose.lawa_step, loose.steps_saved) == (99000, 60000, 39000)
    never = saving(original, {21000: 40.0, 141000: 20.5}, 0.0, hours)
    assert never.lawa_step is None and never.gpu_hours_saved is None
    assert gpu_hours_per_step("EleutherAI/pythia-1b-deduped") == hours
    assert gpu_hours_per_step("pythia-12b") == 72300 / 143000

    results = tmp_path / "perplexity.jsonl"
    records = [{"model": "EleutherAI/pythia-1b-deduped", "step": s, "kind": kind, "file": "data/philpapers.jsonl",
                "word_perplexity": traj[s]} for kind, traj in (("original", original), ("lawa", lawa)) for s in traj]
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    main(["savings", str(results), "--tolerance", "0", "1.5", "--plot", str(tmp_path / "fig6.png")])
    lines = capsys.readouterr().out.splitlines()
    assert "original 20.000 at step 141000" in lines[0]
    cells = [cell.strip() for cell in lines[2].split("|")]
    assert cells == ["0", "20.000", "141000", "99000", "42000", f"{42000 * hours:.0f}"]
    assert [cell.strip() for cell in lines[3].split("|")][2:5] == ["99000", "60000", "39000"]
    assert (tmp_path / "fig6.png").stat().st_size > 0
