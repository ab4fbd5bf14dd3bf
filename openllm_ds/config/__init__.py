"""The config layer: typed configs, one per concern (``run.py``: the run config's sections and how they compose;
``stages.py``: the other stages' configs and which types each subcommand's flags come from; ``fields.py``: a field
that is also a flag). It imports no stage: the stages import it.

Precedence: dataclass defaults < YAML preset (``--config``) < model JSON (``--model_config``)
< CLI flags < ``section.key=value`` overrides. Unknown keys and wrong types are errors that
name the key and the file before any work starts. Configs are never mutated at run time:
runtime state lives in the trainer's state object.
"""

from openllm_ds.config.fields import INT64, add_flags, setting, stage_config
from openllm_ds.config.run import (DOC_SEPARATORS, ON_BAD_RECORD, PATH_KEYS, RETIRED_KEYS, DataConfig, EvalConfig,
                                   ExportConfig, FinetuneConfig, ModelConfig, ReadOptions, RunConfig, TokenizerConfig, TrainConfig,
                                   load_run_config, parse_overrides, read_config_yaml, read_model_json,
                                   run_config_from_dict, validation_source)
from openllm_ds.config.stages import (LAYOUTS, RUN_CONFIG_STAGES, STAGES, EvaluateConfig, GenerateConfig, PipelineConfig,
                                      PrepareSftConfig, RunOptions, ScoreSquadConfig, ServeConfig, TokenizeConfig)

__all__ = ["INT64", "add_flags", "setting", "stage_config", "DOC_SEPARATORS", "ON_BAD_RECORD", "PATH_KEYS",
           "RETIRED_KEYS", "DataConfig", "EvalConfig", "ExportConfig", "FinetuneConfig", "LAYOUTS", "PrepareSftConfig", "ModelConfig", "ReadOptions", "RunConfig",
           "TokenizerConfig", "TrainConfig", "load_run_config", "parse_overrides", "read_model_json",
           "read_config_yaml",
           "run_config_from_dict", "validation_source", "RUN_CONFIG_STAGES", "STAGES", "EvaluateConfig",
           "GenerateConfig", "PipelineConfig", "RunOptions", "ScoreSquadConfig", "ServeConfig", "TokenizeConfig"]
