"""Package discovery (the rest of the metadata is in pyproject.toml).

Every package under openllm_ds/ is found, so a new subpackage ships without an edit here. The top-level folders
configs/, ds_configs/ and eval/ ship inside the package as openllm_ds.presets.<folder>: preset names (``--config
tiny``, ``--ds_config zero3``, task names) then work from any directory after a plain ``pip install``.
"""

from setuptools import find_packages, setup

PRESETS = {f"openllm_ds.presets.{folder}": folder for folder in ("configs", "ds_configs", "eval")}

setup(packages=find_packages(include=["openllm_ds", "openllm_ds.*"]) + list(PRESETS), package_dir=PRESETS)
