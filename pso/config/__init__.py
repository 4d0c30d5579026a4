"""Typed configuration: strict pydantic models loaded from YAML, environment and command line."""

from pso.config.loader import ConfigError, StrictModel, dump_config, load_config

__all__ = ["ConfigError", "StrictModel", "dump_config", "load_config"]
