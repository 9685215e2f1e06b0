"""A reward program for `ppo train --reward-command` that logs beside its rewards: each
answer is 1, with the metrics given as the first argument (JSON, `"metrics"` of every
answer) and the response's place in its batch ("I of N", from the request's "batch") as the
extra column "place"."""
import json
import sys

metrics = json.loads(sys.argv[1])
for line in sys.stdin:
    place = json.loads(line)["batch"]
    extra = {"place": f"{place['index']} of {place['size']}"}
    print(json.dumps({"reward": 1, "metrics": metrics, "extra": extra}), flush=True)
