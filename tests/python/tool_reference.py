"""References for the tool-calling test (ppo/tests/tools.rs): TRL 1.16's own functions on
the chat templates `template_reference.py make` writes (Qwen2.5, Qwen3, Qwen3.5 — its calls
`<function=…>` blocks —, Llama 3.1, GLM-4-MoE, Gemma 4, gpt-oss, LFM2.5, Nemotron 3 Nano and
DeepSeek-R1-Distill, whose template writes no calls), and Nemotron 3
Nano's with a response template of its own (TRL's `nemotron_3_template` saved into its
tokenizer_config.json as transformers saves one: DIR/nemotron_native), which the trainer uses
instead of `add_response_schema`'s. Also TRL's response templates themselves, as JSON.

    tool_reference.py --root DIR

Prints, per template: for each answer text (its EOS appended and tokenized as the model
would have sampled it) the message `trl.chat_template_utils.parse_response` makes of it
(after `add_response_schema`: content, reasoning and tool calls, or the plain text where it
cannot read them), after the generation prompt and after one that opens a think block
(`prefilled`), and, parsed with tool schemas (`TOOLS`: the call's text arguments typed by
them), answers whose arguments are text; and for each list
of tool results the token ids `GRPOTrainer._get_tool_suffix_ids` appends after an answer
(with TRL's training template where the trainer swaps one in: `training_template`).
Also `str` of what tool programs may answer, parsed as JSON, and of TRL's error dicts.
"""
import argparse
import json
import shutil
import types

from transformers import AutoTokenizer
from trl import chat_template_utils
from trl.chat_template_utils import (
    add_response_schema,
    get_training_chat_template,
    is_chat_template_prefix_preserving,
    parse_response,
)
from trl.trainer.grpo_trainer import GRPOTrainer

TEMPLATES = ["qwen2_5", "qwen3", "qwen3_5_nothink", "llama3_1", "glm4moe", "gemma4", "gptoss", "lfm2_2_5",
             "nemotron_3_nano", "deepseek_r1_distill", "nemotron_native"]
BUILTIN = ["qwen3", "qwen3_5", "nemotron_3", "llama3", "glm4moe", "gemma4", "gptoss", "lfm2_2_5",
           "deepseek_r1_distill"]
TEXTS = [
    '<tool_call>\n{"name": "calc", "arguments": {"expr": "2*3"}}\n</tool_call>',
    'Let me see.\n<tool_call>\n{"name": "calc", "arguments": {"expr": "2*3"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "heads", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "calc", "arguments": {"expr": "35*2",\n "round": 2}}\n</tool_call>',
    '<tool_call>{"name": "calc"}</tool_call> and some text after',
    '<tool_call>{"name": "calc", "arguments": {bad}}</tool_call>',
    '<tool_call>{"name": "calc", "arguments": {"expr": "1"}}',
    '<tool_call>{"arguments": {"expr": "1"}}</tool_call>',
    '<tool_call>\n{"name": "calc", "arguments": "2*3"}\n</tool_call>',
    '<tool_call>{"name": "calc", "arguments": [1, 2]}</tool_call>',
    '{"name": "calc", "parameters": {"expr": "1+1"}}',
    '{"name": "鸡兔", "parameters": {"heads": 35, "legs": 94}}',
    "23 chickens and 12 rabbits. The answer is 12",
    '<think>\nLet me count.\n</think>\n\n<tool_call>\n{"name": "calc", "arguments": {"expr": "2*3"}}\n</tool_call>',
    'Sure. {"name": "calc", "parameters": {"expr": "1+1"}}',
    'A<tool_call>{"name": "calc", "arguments": null}</tool_call>B',
]
TEXTS += [
    '<tool_call>\n<function=calc>\n<parameter=expr>\n2*3\n</parameter>\n</function>\n</tool_call>',
    'Let me see.\n\n<tool_call>\n<function=calc>\n<parameter=expr>\n(94-70)\n/2\n</parameter>\n'
    '</function>\n</tool_call>\n<tool_call>\n<function=heads>\n</function>\n</tool_call>',
    '<tool_call>\n<function=calc>\n<parameter=expr>\n1\n</parameter>\n</function>',
]
TEXTS += [  # GLM-4-MoE, Gemma 4, gpt-oss
    '<tool_call>calc\n<arg_key>expr</arg_key>\n<arg_value>2*3</arg_value>\n</tool_call>',
    'Let me see.<tool_call>calc\n<arg_key>expr</arg_key>\n<arg_value>(94-70)/2</arg_value>\n</tool_call>'
    '<tool_call>heads\n</tool_call>',
    '<|tool_call>call:calc{expr:<|"|>2*3<|"|>}<tool_call|>',
    '<|channel>thought\nNeed calc.<channel|>Let me see.<|tool_call>call:calc{expr:<|"|>a, b: {c}<|"|>,round:2}'
    '<tool_call|><|tool_call>call:heads{}<tool_call|>',
    '<|tool_call>call:calc{expr:bad}<tool_call|>',
    '<|channel|>analysis<|message|>Need calc.<|end|><|start|>assistant to=functions.calc<|channel|>commentary '
    'json<|message|>{"expr": "2*3"}<|call|>',
    '<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>The answer is 12',
    "<|tool_call_start|>[calc(expr='2*3')]<|tool_call_end|>",
    "<think>hm</think>Let me see.<|tool_call_start|>[calc(expr='(94-70)/2', round=2), heads()]<|tool_call_end|>",
    '<think>\nunclosed <tool_call>\n<function=calc>\n<parameter=expr>\n1\n</parameter>\n</function>\n</tool_call>',
]
# Parsed with these schemas: text arguments typed by their parameters.
TOOLS = [{"type": "function", "function": {"name": "solve", "parameters": {"type": "object", "properties": {
    "heads": {"type": "integer"}, "legs": {"type": "number"}, "exact": {"type": "boolean"},
    "note": {"type": ["string", "null"]}, "pair": {"type": "array"}, "size": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}}}},
    {"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}]
TYPED = [
    '<tool_call>\n{"name": "solve", "arguments": {"heads": "35", "legs": "94.0", "exact": "true", "note": "None", '
    '"pair": "[1, 2]", "size": "big", "other": "7"}}\n</tool_call>',
    '<tool_call>\n<function=solve>\n<parameter=heads>\n3_5\n</parameter>\n<parameter=legs>\n1e2\n</parameter>\n'
    '<parameter=exact>\n0\n</parameter>\n<parameter=note>\nnull\n</parameter>\n<parameter=pair>\n[1, 2]\n'
    '</parameter>\n<parameter=size>\n4.0\n</parameter>\n<parameter=other>\n7\n</parameter>\n</function>\n</tool_call>',
    '<tool_call>\n<function=calc>\n<parameter=expr>\n35\n</parameter>\n</function>\n</tool_call>',
    '{"name": "solve", "parameters": {"heads": " 12 ", "legs": "inf", "exact": "yes", "pair": ["1"]}}',
    '<tool_call>solve\n<arg_key>heads</arg_key>\n<arg_value>35</arg_value>\n<arg_key>exact</arg_key>\n'
    '<arg_value>true</arg_value>\n</tool_call>',
    '<|tool_call>call:solve{heads:<|"|>35<|"|>,legs:94}<tool_call|>',
    '<|start|>assistant to=functions.solve<|channel|>commentary json<|message|>{"heads": "35", "legs": "1e2"}<|call|>',
    "<|tool_call_start|>[solve(heads='35', legs=94, pair=[1, [2, {\"a\": 3}]], note=None, exact=true)]<|tool_call_end|>",
]
# Answered after a prompt whose assistant turn opens a think block.
PREFILLED = ["counting</think>\n\nThe answer is 12", '</think><tool_call>{"name": "calc"}</tool_call>']
# What tool programs answer (the JSON after "result"), and errors: TRL writes
# str(result) into the tool message, and str({"error": str(e)}) for a failure.
VALUES = [
    '"6"', '6', '6.0', '0.5', '1e-05', '1e16', '123456789012345678.5', '-0.0', 'true', 'null',
    '[1, 2.5, "x"]', '{"heads": 35, "legs": 94.0, "ok": false, "note": null}',
    '{"b": 1, "a": {"nested": ["it\'s", "say \\"hi\\"", "both \' and \\""]}}',
    '"no quotes: \'"', '["tab\\tnew\\nline\\\\ \\u0007 \\u00a0 \\u00e9 \\u3000 \\u200b 鸡兔 \\ud83d\\udc14"]',
]
ERRORS = ["division by zero", "it's \"bad\"", "Tool calc not found."]
RESULTS = [
    [["calc", "6"]],
    [["calc", "6"], ["heads", "35 头"]],
    [["calc", '{"error": "division by zero"}']],
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    # A tokenizer with a response template of its own.
    native = AutoTokenizer.from_pretrained(f"{args.root}/nemotron_3_nano")
    native.response_template = chat_template_utils.nemotron_3_template
    native.save_pretrained(f"{args.root}/nemotron_native")
    shutil.copy(f"{args.root}/nemotron_3_nano/rows.jsonl", f"{args.root}/nemotron_native/rows.jsonl")
    out = {"response_templates": {n: getattr(chat_template_utils, f"{n}_template") for n in BUILTIN}}
    for name in TEMPLATES:
        tok = AutoTokenizer.from_pretrained(f"{args.root}/{name}")
        if getattr(tok, "response_template", None) is None:  # as GRPOTrainer: only without one
            tok = add_response_schema(tok)
        prefix = tok.apply_chat_template(
            [{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        think = prefix + tok("<think>\n", add_special_tokens=False)["input_ids"]
        parsed = []
        for texts, before, tools in [(TEXTS, prefix, None), (PREFILLED, think, None), (TYPED, prefix, TOOLS)]:
            for text in texts:
                ids = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
                message = parse_response(tok, ids, prefix=before, tools=tools)
                parsed.append({"text": text, "prefix": before, "ids": ids, "tools": tools, "message": message})
        # The trainer swaps a template that is not prefix-preserving (Qwen3's) for TRL's
        # training template; then its method on a stand-in holding what it reads.
        chat_template = None
        if not is_chat_template_prefix_preserving(tok):
            chat_template = get_training_chat_template(tok)
        trainer = types.SimpleNamespace(
            processing_class=tok, _tokenizer=tok, chat_template=chat_template, chat_template_kwargs={}, _is_vlm=False
        )
        suffixes = []
        for results in RESULTS:
            messages = [{"role": "tool", "name": n, "content": c} for n, c in results]
            suffixes.append({"results": results, "ids": GRPOTrainer._get_tool_suffix_ids(trainer, messages)})
        out[name] = {"parsed": parsed, "suffixes": suffixes, "training_template": chat_template}
    out["str"] = [[v, str(json.loads(v))] for v in VALUES]
    out["errors"] = [[e, str({"error": e})] for e in ERRORS]
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
