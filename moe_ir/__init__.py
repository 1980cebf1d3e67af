"""moe-ir: a compiler for DeepSeekMoE-style Mixture-of-Experts layers."""
