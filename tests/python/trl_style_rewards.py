"""Reward functions written for TRL's `GRPOTrainer`, for the `scripts/trl_reward.py` test:
each takes TRL's arguments (lists over completions) and returns a list of rewards."""
import json
import os


def digits_and_length(prompts, completions, completion_ids, answer, id, trainer_state,
                      log_metric, log_extra, **kwargs):
    """The digits in a conversational completion plus its tokens / 100, 1 more where the
    row's answer appears and the steps done; None on rows with an odd id (not this
    function's task). Logs (TRL's `log_metric`) how many completions the call got and the
    mean of its rewards, and (`log_extra`) each completion's digits. With
    TRL_STYLE_LOG set, each call's arguments are appended there as a JSON line."""
    if os.environ.get("TRL_STYLE_LOG"):
        with open(os.environ["TRL_STYLE_LOG"], "a") as log:
            call = {"prompts": prompts, "completions": completions,
                    "completion_ids": completion_ids, "answer": answer, "id": id,
                    "step": [trainer_state.global_step, trainer_state.max_steps],
                    "other": sorted(kwargs)}
            log.write(json.dumps(call) + "\n")
    rewards = []
    for completion, ids, a, i in zip(completions, completion_ids, answer, id):
        if i % 2 == 1:
            rewards.append(None)
            continue
        text = completion[0]["content"]
        digits = sum(c in "0123456789" for c in text)
        rewards.append(digits + len(ids) / 100 + float(a in text) + trainer_state.global_step)
    scored = [r for r in rewards if r is not None]
    log_metric("digits/batch_size", len(completions))
    if scored:
        log_metric("digits/mean", sum(scored) / len(scored))
    log_extra("digits", [sum(c in "0123456789" for c in c[0]["content"]) for c in completions])
    return rewards


async def async_length(completions, **kwargs):
    """An async reward function: the completion's characters / 10."""
    return [len(c[0]["content"]) / 10 for c in completions]
