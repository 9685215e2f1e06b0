"""A reward program for `ppo train --reward-command` (the GRPO test): reads one JSON line per
response, answers {"reward": 4 × the share of digits among the response's characters}.
Exits 1 if a row lost its prompt row's fields on the way."""
import json
import sys

for line in sys.stdin:
    row = json.loads(line)
    if "answer" not in row or "id" not in row or "prompt" not in row:
        sys.exit(1)
    text = "".join(row["response"].split())
    share = sum(c.isdigit() for c in text) / max(len(text), 1)
    print(json.dumps({"reward": 4 * share}), flush=True)
