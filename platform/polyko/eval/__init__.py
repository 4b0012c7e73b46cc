"""KoBEST evaluation with lm-eval's own kobest tasks (the Polyglot-Ko paper's benchmark).

    from polyko.eval import EvalConfig, evaluate
    evaluate(EvalConfig(model="work/quickstart/pretrain/hf", shots=[0], limit=20, kobest_dir="../shared/data/kobest"))

Modules: ``config`` (EvalConfig), ``kobest`` (offline task YAML + the lm-eval call), ``runner``
(evaluate: outputs + MLflow), ``table`` (the paper-style table vs ``published_kobest.json``),
``compare`` (a table of MLflow runs). Job: ``jobs/evaluate.py``.
"""

from polyko.eval.config import KOBEST_TASKS, EndpointConfig, EvalConfig
from polyko.eval.runner import evaluate

__all__ = ["EvalConfig", "EndpointConfig", "KOBEST_TASKS", "evaluate"]
