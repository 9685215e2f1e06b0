"""A reward program for `ppo train --reward-command` that logs beside its rewards: each
answer is 1, with the metrics given as the first argument (JSON, `"metrics"` of every
answer) and the response's place in its batch ("I of N", from the request's "batch") as the
extra column "place". With the argument `by-prompt` the metrics are the response's
characters ("chars") and a 1 named by the prompt ("prompt/TEXT"): names that differ from
rank to rank."""
import json
import sys

fixed = None if sys.argv[1] == "by-prompt" else json.loads(sys.argv[1])
for line in sys.stdin:
    row = json.loads(line)
    place = row["batch"]
    extra = {"place": f"{place['index']} of {place['size']}"}
    metrics = fixed
    if metrics is None:
        metrics = {"chars": len(row["response"]), f"prompt/{row['prompt'].strip()}": 1}
    print(json.dumps({"reward": 1, "metrics": metrics, "extra": extra}), flush=True)
