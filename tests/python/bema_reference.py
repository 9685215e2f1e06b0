"""TRL 1.16's BEMACallback (trl.trainer.callbacks) replayed over a run's checkpoints, for
the `--bema` parity test.

    bema_reference.py --model DIR --checkpoints DIR,DIR,... --out DIR --kwargs JSON
        DIR: the model the run started from; the checkpoints are the model after steps 1,
        2, ... (every step's). The callback sees the run as a Trainer would show it:
        on_train_begin with the starting model, on_step_end with global_step = t and the
        model holding step t's weights, on_train_end, which saves OUT/bema. JSON: the
        callback's keyword arguments. Prints {"steps": N}.
"""
import argparse
import json
from types import SimpleNamespace

import torch
import transformers as tf
from transformers import TrainerState
from trl.trainer.callbacks import BEMACallback


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kwargs", required=True)
    a = p.parse_args()

    load = lambda d: tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model = load(a.model)
    callback = BEMACallback(**json.loads(a.kwargs))
    args = SimpleNamespace(output_dir=a.out)
    state = TrainerState()
    callback.on_train_begin(args, state, None, model=model)
    checkpoints = a.checkpoints.split(",")
    for step, directory in enumerate(checkpoints, start=1):
        with torch.no_grad():
            model.load_state_dict(load(directory).state_dict())
        state.global_step = step
        callback.on_step_end(args, state, None, model=model)
    callback.on_train_end(args, state, None)
    print(json.dumps({"steps": len(checkpoints)}))


if __name__ == "__main__":
    main()
