"""Built-in tasks that need no download (a tokenizer trained locally, a generated corpus, a hidden
gold reward, Bradley-Terry preference labels) and the tiny model configs used in tests."""

from rlhf_fast.tasks.sentiment import SentimentTaskConfig, gold_reward, gold_score
from rlhf_fast.tasks.arithmetic import ArithmeticTaskConfig, TinyArithmeticTask
from rlhf_fast.tasks.task import TASKS, TinySentimentTask, get_task
from rlhf_fast.tasks.tiny_models import (
    ARCHITECTURES,
    tiny_config,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_neox_config,
    tiny_qwen2_config,
)

__all__ = [
    "ARCHITECTURES", "ArithmeticTaskConfig", "SentimentTaskConfig", "TinyArithmeticTask", "TASKS", "TinySentimentTask", "get_task", "gold_reward", "gold_score",
    "tiny_config", "tiny_gpt2_config", "tiny_llama_config", "tiny_neox_config", "tiny_qwen2_config",
]
