"""Generation, one path for the Python API (``openllm_ds.load``), the built-in server's backends and evaluation
(``openllm-ds generate``, the harness tasks): the prompt convention (``Completer.encode``), detokenisation and stop
strings (``detokenize``), the sampling parameters and their ranges (``sampling``), and the loader
(``load_completer``). The chat template is rendered on the tokenizer side (``openllm_ds.tokenizer.chat``), where
training renders conversations too.
"""

from openllm_ds.inference.completer import Completer, DecodePath, Generation, default_threads, greedy_continuation
from openllm_ds.inference.detokenize import Choice, PieceTexts, StepUpdate, continuation_text
from openllm_ds.inference.load import BACKENDS, load_completer
from openllm_ds.inference.sampling import SamplingError, SamplingParams

__all__ = ["Completer", "DecodePath", "Generation", "Choice", "PieceTexts", "StepUpdate", "SamplingParams",
           "SamplingError", "load_completer", "default_threads", "greedy_continuation", "continuation_text", "BACKENDS"]
