"""radray's command line: ``radray <verb> --config FILE [key.sub=value ...]``.

Each verb runs one job's ``main`` with the rest of the arguments, so ``radray preprocess ...`` and
``python -m ray_jobs.preprocess ...`` are the same job.
"""
from __future__ import annotations

import difflib
import importlib
import sys

VERBS = {
    "make-phantom": ("ray_jobs.make_phantom", "write the phantom CT dataset (volumes, reports, VQA, labels)"),
    "preprocess": ("ray_jobs.preprocess", "raw CT -> fixed-shape Parquet shards and sample tables (Ray Data)"),
    "tokenizer": ("ray_jobs.train_tokenizer", "refit an LLM's tokenizer to a dataset's training text"),
    "pretrain-mae": ("ray_jobs.pretrain_mae", "3D MAE pretraining of a ViT (E3D-GPT, Ray Train)"),
    "pretrain-contrastive": ("ray_jobs.pretrain_contrastive",
                             "SigLIP/CLIP pretraining of a 3D or per-slice encoder (Med3DVLM, Ray Train)"),
    "train": ("ray_jobs.train_vlm", "VLM tuning, stage align or finetune (Ray Train)"),
    "evaluate": ("ray_jobs.evaluate", "batch evaluation and online inference (Ray Serve)"),
    "quickstart": ("ray_jobs.quickstart", "the whole pipeline on the phantom data, with the learning proof"),
    "sweep": ("tune.sweep", "an ablation sweep rendered as its paper's table (Ray Tune)"),
    "summary": ("components.models.summary", "parameters, LLM tokens and GFLOPs per part of a VLM config"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: radray <verb> --config FILE [key.sub=value ...]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {what}" for verb, (_, what) in VERBS.items()]
    lines += ["", "radray <verb> --help shows a verb's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"radray: unknown verb {verb!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    # argparse names the program after argv[0]: make a verb's --help and errors read "radray <verb>"
    prog, sys.argv[0] = sys.argv[0], f"radray {verb}"
    try:
        result = importlib.import_module(VERBS[verb][0]).main(rest)
    finally:
        sys.argv[0] = prog
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
