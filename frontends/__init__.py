"""Readers that turn user input (YAML specs, Hugging Face configs) into moe-ir specs."""
from .yaml_spec import load_spec, load_spec_text

__all__ = ["load_spec", "load_spec_text"]
