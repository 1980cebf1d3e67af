"""Readers that turn user input (YAML specs, Hugging Face configs) into moe-ir specs."""
from .yaml_spec import load_any, load_any_text, load_model_spec, load_model_spec_text, load_spec, load_spec_text

__all__ = ["load_any", "load_any_text", "load_model_spec", "load_model_spec_text", "load_spec", "load_spec_text"]
