"""A reward program for `ppo train --reward-command` that applies to some rows only, as a
TRL reward function returning None does in multi-task training: rows with an odd id are not
its task ({"reward": null}); on the others it answers null for a response of an odd number
of characters and 4 × the share of ASCII digits among the response's characters otherwise."""
import json
import sys

for line in sys.stdin:
    row = json.loads(line)
    text = row["response"]
    if row["id"] % 2 == 1 or len(text) % 2 == 1:
        reward = None
    else:
        reward = 4 * sum(c in "0123456789" for c in text) / max(len(text), 1)
    print(json.dumps({"reward": reward}), flush=True)
