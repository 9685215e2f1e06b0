"""References for the chat-template test (issue 23): `transformers`' `apply_chat_template`
on the chat templates real instruct models ship.

    template_reference.py make --root DIR

Templates: the originals TRL keeps in `trl/chat_templates/` (installed by the bootstrap as
`trl==1.16.0 --no-deps`; read as files, TRL is never imported): Llama 3.1, Llama 3.2,
Qwen2.5, Phi-3, Gemma (Gemma and Gemma 2 ship the same one), DeepSeek-V3, Qwen3 (with
rows that carry TRL's `chat_template_kwargs`), Qwen3.5 (no-think), Qwen3.6, GLM-4-MoE,
Gemma 3, Gemma 4, gpt-oss, LFM2.5, DeepSeek-R1-Distill, Nemotron 3 Nano, Phi-3.5, Cohere 2; Mistral v0.2/v0.3
as axolotl keeps it (`axolotl/utils/chat_templates/templates/mistral_v2v3.jinja`, installed
the same way: Mistral's own with typed content parts read); and ChatML.
One byte-level BPE tokenizer (trained here, with every template's special tokens) goes
into DIR/<template>/ with the template; DIR/<template>/rows.jsonl holds SFT rows (multi-turn
with Chinese text, a system turn where the template allows one, tool calls where it
supports them, and a row it refuses). Prints, per template and row: the token ids of the
rendered conversation and the loss mask by the documented rule (each assistant turn from
where the conversation-so-far rendered with the generation prompt stops agreeing with the
whole conversation — DeepSeek-V3's generation prompt adds "<think>\n" — to where the
conversation rendered through that turn stops agreeing with it — Phi-3 ends a rendering
with EOS, which the whole conversation has only at its end), or the template's error.
"""
import argparse
import importlib.util
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TRL_TEMPLATES = ["llama3_1", "llama3_2", "qwen2_5", "phi3", "gemma", "deepseekv3", "qwen3", "qwen3_5_nothink",
                 "glm4moe", "gemma4", "gptoss", "lfm2_2_5", "deepseek_r1_distill", "nemotron_3_nano", "qwen3_6",
                 "gemma3", "phi3_5", "cohere2"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# (bos, eos) of each template's model family.
SPECIAL = {
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2_5": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "qwen3_5_nothink": (None, "<|im_end|>"),
    "glm4moe": (None, "<|endoftext|>"),
    "gemma4": ("<bos>", "<turn|>"),
    "gptoss": (None, "<|return|>"),
    "lfm2_2_5": ("<|startoftext|>", "<|im_end|>"),
    "deepseek_r1_distill": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "nemotron_3_nano": (None, "<|im_end|>"),
    "qwen3_6": (None, "<|im_end|>"),
    "gemma3": ("<bos>", "<end_of_turn>"),
    "phi3_5": ("<s>", "<|end|>"),
    "cohere2": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "gemma": ("<bos>", "<eos>"),
    "deepseekv3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "chatml": (None, "<|im_end|>"),
    "mistral_v2v3": ("<s>", "</s>"),
}
SPECIALS = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|python_tag|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|user|>", "<|assistant|>",
    "<|system|>", "<|end|>", "<|endoftext|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[gMASK]", "<sop>", "<|observation|>",
    "<|turn>", "<turn|>", "<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|startoftext|>",
    "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|call|>", "<|tool_call>", "<tool_call|>",
    '<|"|>', "<|channel>", "<channel|>", "<|tool_response>", "<tool_response|>", "<|tool_call_start|>",
    "<|tool_call_end|>",
]
CORPUS = [
    "你是一个解题助手。鸡兔同笼，35个头，94只脚？鸡23只，兔12只。",
    "There are 35 heads and 94 legs. Why? 2*23 + 4*12 = 94. Cutting Knowledge Date: December 2023",
    "Environment: ipython Today Date: function parameters name solve heads legs arguments type",
    '{"name": "solve", "parameters": {"heads": 35, "legs": 94}} system user assistant model tool',
] * 20

SYSTEM = {"role": "system", "content": "你是一个解题助手。"}
TURNS = [
    {"role": "user", "content": "鸡兔同笼，35个头，94只脚？"},
    {"role": "assistant", "content": "鸡23只，兔12只。"},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "2*23 + 4*12 = 94."},
]
TOOLS = [{"type": "function", "function": {
    "name": "solve", "description": "Chickens and rabbits from heads and legs.",
    "parameters": {"type": "object", "properties": {
        "heads": {"type": "integer"}, "legs": {"type": "integer"}}, "required": ["heads", "legs"]}}}]


def tool_row(arguments, tool_role="tool"):
    return {"messages": [
        {"role": "user", "content": "35 heads, 94 legs?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "solve", "arguments": arguments}}]},
        {"role": tool_role, "name": "solve", "content": "23, 12"},
        {"role": "assistant", "content": "23 chickens and 12 rabbits."},
    ], "tools": TOOLS}


def mistral_rows():
    """Mistral: without a system message, typed parts, tool calls with its 9-character ids;
    then a system message, which its template moves into the last user turn (and drops
    when an assistant turn ends the conversation), so the prefix rule is refused."""
    tools = tool_row({"heads": 35, "legs": 94})
    tools["messages"][1]["tool_calls"][0]["id"] = "call00001"
    tools["messages"][2]["tool_call_id"] = "call00001"
    return [
        {"messages": TURNS},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "鸡兔"},
                                                   {"type": "text", "text": "同笼？"}]},
                      {"role": "assistant", "content": "23, 12."}]},
        tools,
        {"messages": [SYSTEM] + TURNS},
    ]


def qwen3_rows():
    """Qwen3: one exchange (its template drops the think block of turns before the last
    query, which the prefix rule cannot follow), with and without TRL's chat_template_kwargs
    column: thinking on, the empty think block the template writes is a target; off, the
    generation prompt holds it, so the targets start after it."""
    no_think = {"enable_thinking": False}
    reasoned = dict(TURNS[1], reasoning="35*2 = 70, 94-70 = 24, 24/2 = 12.")
    return [
        {"messages": [SYSTEM] + TURNS[:2]},
        # The reasoning under its newer name: transformers passes it as reasoning_content too.
        {"messages": [TURNS[0], reasoned]},
        {"messages": TURNS[:2], "chat_template_kwargs": no_think},
        {"prompt": TURNS[:1], "completion": TURNS[1:2], "chat_template_kwargs": no_think},
    ]


def rows_for(name):
    """Rows for one template: what it accepts, then one it refuses where it refuses any."""
    if name == "mistral_v2v3":
        return mistral_rows()
    if name == "qwen3":
        return qwen3_rows()
    if name in ("qwen3_5_nothink", "qwen3_6"):  # as Qwen3 (earlier turns' think blocks dropped), and a tool call
        return qwen3_rows() + [tool_row({"heads": 35, "legs": 94})]
    rows = [{"messages": TURNS}]
    if name != "gemma":
        rows.append({"messages": [SYSTEM] + TURNS})
        # Content as typed text parts (joined), an empty system message.
        rows.append({"messages": [{"role": "system", "content": ""},
                                  {"role": "user", "content": [{"type": "text", "text": "鸡兔"},
                                                               {"type": "text", "text": "同笼？"}]},
                                  {"role": "assistant", "content": "23, 12."}]})
    if name in ("llama3_1", "llama3_2", "qwen2_5", "glm4moe", "gemma4", "lfm2_2_5", "nemotron_3_nano"):
        rows.append(tool_row({"heads": 35, "legs": 94}))
    if name in ("qwen2_5", "chatml"):
        # Conversational prompt-completion: the completion's turns only are targets.
        rows.append({"prompt": TURNS[:3], "completion": TURNS[3:]})
    if name == "gptoss":
        # TRL's gpt-oss recipe data (HuggingFaceH4/Multilingual-Thinking): the reasoning in
        # the assistant turn's `thinking` (its analysis channel, a target), a developer
        # turn, and the template's reasoning_effort through chat_template_kwargs.
        thought = dict(TURNS[1], thinking="35*2 = 70, 94-70 = 24, 24/2 = 12.")
        developer = {"role": "developer", "content": "reasoning language: 中文"}
        rows.append({"messages": [developer, TURNS[0], thought],
                     "chat_template_kwargs": {"reasoning_effort": "high"}})
    if name == "gemma":
        rows.append({"messages": [SYSTEM] + TURNS})  # System role not supported
    if name == "llama3_1":
        two = tool_row({"heads": 35, "legs": 94})
        call = two["messages"][1]["tool_calls"][0]
        two["messages"][1]["tool_calls"] = [call, call]  # only single tool-calls
        rows.append(two)
    return rows


# A conversational preference row, with the template arguments TRL's DPO, reward and KTO
# trainers pass (`tools`, and the `chat_template_kwargs` column).
PREFERENCE_ROW = {"prompt": [{"role": "user", "content": "35 heads, 94 legs?"}],
                  "chosen": [{"role": "assistant", "content": "23 chickens and 12 rabbits."}],
                  "rejected": [{"role": "assistant", "content": "12 chickens."}]}
PREFERENCE_ARGS = {"llama3_1": {"tools": TOOLS}, "qwen3": {"chat_template_kwargs": {"enable_thinking": False}}}


def preference_reference(tok, row):
    """TRL 1.16's DPO tokenization of a conversational row: the prompt rendered with the
    generation prompt, prompt + each response without it, both with the row's tools and
    chat_template_kwargs; the completions start after the shorter common prefix."""
    kwargs = {"tools": row.get("tools"), **row.get("chat_template_kwargs", {})}
    ids = lambda msgs, gen: tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kwargs),
                                add_special_tokens=False)["input_ids"]
    prompt = ids(row["prompt"], True)
    chosen, rejected = ids(row["prompt"] + row["chosen"], False), ids(row["prompt"] + row["rejected"], False)
    common = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    n = min(common(prompt, chosen), common(prompt, rejected))
    return {"prompt": prompt[:n], "chosen": chosen[n:], "rejected": rejected[n:], "full_chosen": chosen,
            "full_rejected": rejected}


def template_source(name):
    if name == "chatml":
        return CHATML
    package, folder = ("axolotl", "utils/chat_templates/templates") if name == "mistral_v2v3" \
        else ("trl", "chat_templates")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"template_reference.py: {package} is not installed (scripts/bootstrap.sh installs it)")
    path = os.path.join(spec.submodule_search_locations[0], folder, name + ".jinja")
    with open(path, encoding="utf-8") as f:
        return f.read()


def as_template_input(messages):
    """What our loader hands the template: typed text parts joined."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        out.append(m)
    return out


def reference(tok, row):
    if row.get("messages") is not None:
        messages, first_target = as_template_input(row["messages"]), 0
    else:
        messages = as_template_input(row["prompt"] + row["completion"])
        first_target = len(row["prompt"])
    tools = row.get("tools")
    kwargs = row.get("chat_template_kwargs") or {}
    render = lambda msgs, gen: tok.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=gen, **kwargs)
    try:
        full = render(messages, False)
    except Exception as e:  # the template's raise_exception
        return {"error": str(e)}
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i >= first_target:
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            # The turns before must render the same with later turns after them (Mistral
            # moves the system message into the last user turn): else refused.
            so_far = render(messages[:i], False)
            rest = so_far[len(os.path.commonprefix([so_far, full])):]
            if i > 0 and messages[i - 1]["content"] and messages[i - 1]["content"] in rest:
                return {"error": "cannot be derived by the prefix rule"}
            start = len(os.path.commonprefix([before, full]))
            end = len(os.path.commonprefix([through, full]))
            assert end > start, "turn not found"
            spans.append((start, end))
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return {"ids": enc["input_ids"], "mask": mask, "text": full}


def parquet_files(d, tok, rows):
    """The rows as `datasets` writes them to Parquet (`Dataset.to_parquet`), one file per
    shape of row (`from_list` takes its columns from the first row): the rows whose contents
    are all strings as plain Arrow structs (a message that lacks a key another has gets it
    as null: tool calls), and, where a shape mixes strings and typed parts, all its rows with
    `datasets`' Json feature (`on_mixed_types="use_json"`). References from the rows as
    `load_dataset("parquet")` gives them back, as TRL's trainers receive them."""
    import datasets
    datasets.disable_progress_bars()
    shapes = []
    for r in rows:
        if tuple(r) not in shapes:
            shapes.append(tuple(r))
    files = []
    for k, shape in enumerate(shapes):
        group = [r for r in rows if tuple(r) == shape]
        typed = lambda r: any(isinstance(m.get("content"), list)
                              for f in ("messages", "prompt", "completion") for m in r.get(f) or [])
        variants = [("plain", [r for r in group if not typed(r)], {})]
        if any(typed(r) for r in group):
            variants.append(("json", group, {"on_mixed_types": "use_json"}))
        for kind, subset, kw in variants:
            if not subset:
                continue
            name = f"rows-{k}-{kind}.parquet"
            datasets.Dataset.from_list(subset, **kw).to_parquet(os.path.join(d, name))
            loaded = datasets.load_dataset("parquet", data_files=os.path.join(d, name), split="train")
            files.append({"file": name, "rows": [reference(tok, r) for r in loaded]})
    return files


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["make"])
    ap.add_argument("--root", required=True)
    args = ap.parse_args()
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    out = {}
    for name in TRL_TEMPLATES + ["mistral_v2v3", "chatml"]:
        d = os.path.join(args.root, name)
        os.makedirs(d, exist_ok=True)
        bos, eos = SPECIAL[name]
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos,
                                      pad_token=eos)
        tok.chat_template = template_source(name)
        tok.save_pretrained(d)
        tok = PreTrainedTokenizerFast.from_pretrained(d)
        rows = rows_for(name)
        with open(os.path.join(d, "rows.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        out[name] = [reference(tok, r) for r in rows]
        out.setdefault("parquet", {})[name] = parquet_files(d, tok, rows)
        if name in PREFERENCE_ARGS:
            row = dict(PREFERENCE_ROW, **PREFERENCE_ARGS[name])
            with open(os.path.join(d, "preferences.jsonl"), "w", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.setdefault("preferences", {})[name] = preference_reference(tok, row)
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
