"""lm-evaluation-harness itself, for the `sft eval --tasks` parity tests.

    lmeval_reference.py bos --model DIR --out DIR
        a copy of DIR whose tokenizer adds a BOS token (<|im_start|>) to every text, so the
        tests cover HFLM's special-token rule (and its "already starts with BOS" exception,
        which ChatML prompts meet)
    lmeval_reference.py run --model DIR --tasks A.yaml,B.yaml [--num-fewshot N] [--limit N]
                            [--apply-chat-template] [--fewshot-as-multiturn true|false]
        lm_eval.simple_evaluate with the `hf` model on CPU in float32, batch size 1; prints
        {"results": {task: {...}}, "samples": {task: [sample, ...]}}
    lmeval_reference.py runs --spec FILE
        several runs in one process: FILE is {name: {"model", "tasks", "num_fewshot", "limit",
        "apply_chat_template", "fewshot_as_multiturn"}}; prints {name: <run's output>}

The task files are loaded through a TaskManager on their directory, which is also the
working directory (relative data files are read from there, as the bundled tasks need). Nothing is
downloaded: the data are local JSON files and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets' Arrow cache of the local files: a scratch directory, removed at exit.
CACHE = tempfile.mkdtemp(prefix="lmeval-cache-")
os.environ["HF_DATASETS_CACHE"] = CACHE


def bos(model, out):
    from tokenizers import Tokenizer, processors
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model, out)
    tok = Tokenizer.from_file(f"{out}/tokenizer.json")
    bos_id = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                      special_tokens=[("<|im_start|>", bos_id)]),
    ])
    tok.save(f"{out}/tokenizer.json")
    with open(f"{out}/tokenizer_config.json") as f:
        cfg = json.load(f)
    cfg["bos_token"] = "<|im_start|>"
    with open(f"{out}/tokenizer_config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    print(json.dumps({"bos_token_id": bos_id}))


def run_one(model, tasks, num_fewshot=None, limit=None, apply_chat_template=False,
            fewshot_as_multiturn=False):
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = [os.path.abspath(p) for p in tasks.split(",")]
    dirs = sorted({os.path.dirname(p) for p in paths})
    # lm-eval reads relative data files from the working directory: the tasks' own.
    os.chdir(dirs[0])
    # Only these files: indexing lm-eval's own thousands of tasks takes longer than the runs.
    tm = TaskManager(include_path=dirs, include_defaults=False)
    import yaml
    names = []
    for p in paths:
        with open(p) as f:
            names.append(yaml.safe_load(f)["task"])
    kw = {}
    if num_fewshot is not None:
        kw["num_fewshot"] = num_fewshot
    if limit is not None:
        kw["limit"] = limit
    # lm-eval prints progress to stdout; keep stdout for the JSON.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        r = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model},dtype=float32", tasks=names,
            task_manager=tm, log_samples=True, device="cpu", batch_size=1,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
            **kw)
    finally:
        sys.stdout = real_stdout
    return {"results": r["results"], "samples": r["samples"]}


def run(a):
    print(json.dumps(run_one(a.model, a.tasks, a.num_fewshot, a.limit, a.apply_chat_template,
                             a.fewshot_as_multiturn == "true"), default=str))


def runs(spec):
    """Several runs in one process (the imports cost more than a tiny model's runs)."""
    with open(spec) as f:
        specs = json.load(f)
    out = {name: run_one(**kw) for name, kw in specs.items()}
    print(json.dumps(out, default=str))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bos")
    b.add_argument("--model", required=True)
    b.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--tasks", required=True)
    r.add_argument("--num-fewshot", type=int)
    r.add_argument("--limit", type=int)
    r.add_argument("--apply-chat-template", action="store_true")
    r.add_argument("--fewshot-as-multiturn", choices=["true", "false"], default="false")
    m = sub.add_parser("runs")
    m.add_argument("--spec", required=True)
    a = p.parse_args()
    try:
        if a.cmd == "bos":
            bos(a.model, a.out)
        elif a.cmd == "runs":
            runs(a.spec)
        else:
            run(a)
    finally:
        shutil.rmtree(CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
