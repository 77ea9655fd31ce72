"""Zero-shot tasks on the held-out Shakespeare (the last 10% of every play, never trained on), as
lm-evaluation-harness task YAMLs over local JSONL, so the CPU default's runs can be scored like
the paper's Table 2 without a download:

- ``shakespeare_word_order`` (multiple choice; acc): a speaker and a line of verse, and four
  candidates for the next line: the true one and three shufflings of its words;
- ``shakespeare_passages`` (rolling log-likelihood, like wikitext): word and byte perplexity and
  bits per byte of held-out passages.

    python data/shakespeare/tasks.py          # writes data/shakespeare/tasks/
    python analyze.py zeroshot out/paper/run --tasks=shakespeare_word_order,shakespeare_passages \\
        --include_path=data/shakespeare/tasks
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_CHARS = 120  # a question and its answers fit the CPU default's context of 128 bytes
TASKS = ("shakespeare_word_order", "shakespeare_passages")


def word_order_questions(text: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` questions spread evenly over the text: a speaker and a line of verse as context, and
    as choices the line that follows and three shufflings of its words, in a random order."""
    rng = random.Random(seed)
    pairs = []
    for speech in text.split("\n\n"):
        speaker, *verse = speech.strip().split("\n")
        pairs += [(f"{speaker}\n{a}\n", b) for a, b in itertools.pairwise(verse)
                  if len(set(b.split())) >= 5 and len(speaker) + len(a) + len(b) + 2 < MAX_CHARS]
    questions = []
    for context, answer in pairs[:: max(1, len(pairs) // n)][:n]:
        choices, words = [answer], answer.split()
        while len(choices) < 4:
            rng.shuffle(words)
            if " ".join(words) not in choices:
                choices.append(" ".join(words))
        rng.shuffle(choices)
        questions.append({"context": context, "choices": choices, "answer": choices.index(answer)})
    return questions


def passages(text: str, n: int, chars: int = 1000) -> list[str]:
    """``n`` passages of about ``chars`` characters, whole speeches, spread evenly over the text."""
    step = max(chars, len(text) // n)
    found = []
    for start in range(0, len(text) - chars, step):
        begin = text.find("\n\n", start) + 2
        end = text.find("\n\n", begin + chars)
        if begin > 1 and end > 0:
            found.append(text[begin:end + 1])
    return found[:n]


def write_tasks(folder: Path, text: str, questions: int = 200, texts: int = 50) -> list[str]:
    """The two tasks' data and YAMLs in ``folder`` (absolute data paths: lm-eval reads them from
    wherever it runs); returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    word_order, passage = folder / "word_order.jsonl", folder / "passages.jsonl"
    word_order.write_text("".join(json.dumps(q) + "\n" for q in word_order_questions(text, questions)))
    passage.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages(text, texts)))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "shakespeare_word_order.yaml").write_text(
        f"task: shakespeare_word_order\n{common}dataset_kwargs:\n  data_files:\n    test: {word_order}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ntarget_delimiter: ""\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n"
    )
    (folder / "shakespeare_passages.yaml").write_text(
        f"task: shakespeare_passages\n{common}dataset_kwargs:\n  data_files:\n    test: {passage}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return list(TASKS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(HERE / "tasks"))
    args = parser.parse_args()
    prepare = runpy.run_path(str(HERE / "prepare.py"))  # the corpus and its held-out split
    val = prepare["split_plays"](prepare["read_plays"]())["val"]
    names = write_tasks(Path(args.out_dir), val)
    print(f"wrote {', '.join(names)} to {args.out_dir}: pass --include_path={args.out_dir} to lm-eval or analyze.py")


if __name__ == "__main__":
    main()
