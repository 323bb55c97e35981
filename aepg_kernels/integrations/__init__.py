"""Integrations with training frameworks, each an optional extra that imports only the public API:
`aepg_kernels.integrations.transformers` (Hugging Face transformers, extra `[llm]`) and
`aepg_kernels.integrations.trl` (TRL's SFTTrainer). See docs/integrations.md.
"""
