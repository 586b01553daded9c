"""The paper's fine-tuning presets as YAML files (installed as ``s3prl_laser.upstream_configs``)."""
