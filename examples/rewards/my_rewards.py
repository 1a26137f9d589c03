"""The custom reward examples/stage-grpo.yaml names (`my_rewards:concise_reasoning`): 1.0 for a completion of
at most `max_words` words, falling linearly to 0 at twice that. Upload it where the manifest's `source` points:

    aws s3 cp examples/rewards/my_rewards.py s3://kubetune-datasets/math/rewards/my_rewards.py

The trainer passes the completions (strings, or message lists for chat prompts) and the manifest's `params` as
strings; see docs (custom rewards) for everything else a reward function may declare.
"""


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return " ".join(str(m.get("content", "")) for m in completion)  # conversational: a list of messages


def concise_reasoning(completions, max_words="200", **kwargs):
    limit = max(1, int(max_words))
    return [max(0.0, min(1.0, 2.0 - len(_text(c).split()) / limit)) for c in completions]
